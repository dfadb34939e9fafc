"""The search server, in-process through FastAPI's TestClient.

The gallery is a few tiny images made here, indexed with a deterministic colour encoder
(``ColourEncoder``: an image is its histogram over a small palette, a text the count of the
palette's colour words), so every ranking can be checked against a naive dot product.
"""

from __future__ import annotations

import atexit
import csv
import io
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient

from tbps.serve import MAX_K, MAX_QUERY_CHARS, ThumbCache, create_app
from tbps.serve.runtime import THUMB_BOX
from tbps.threads import torch_threads

PALETTE = {  # name -> RGB; the embedding has one dimension per name
    "red": (220, 30, 30),
    "green": (30, 160, 60),
    "blue": (30, 60, 210),
    "yellow": (235, 210, 40),
    "black": (20, 20, 20),
    "white": (240, 240, 240),
    "orange": (240, 140, 20),
    "purple": (130, 40, 160),
}
NAMES = list(PALETTE)


class ColourEncoder:
    """A stand-in for ``tbps.retrieval.encoder.Encoder`` with the same interface and exact semantics."""

    embed_dim = len(PALETTE)
    fingerprint: ClassVar[dict] = {
        "checkpoint_sha256": "0" * 64,
        "arch": "colour-histogram",
        "image_size": [32, 16],
        "mean": [0.0, 0.0, 0.0],
        "std": [1.0, 1.0, 1.0],
        "embed_dim": len(PALETTE),
    }
    _palette = torch.tensor(list(PALETTE.values()), dtype=torch.float32) / 255.0  # (D, 3)

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        im = image.convert("RGB").resize((16, 32), Image.Resampling.NEAREST)
        return torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1)  # (3, 32, 16)

    def encode_images(self, pixels: torch.Tensor) -> np.ndarray:
        b = pixels.shape[0]
        flat = pixels.reshape(b, 3, -1).transpose(1, 2)  # (B, P, 3)
        nearest = torch.cdist(flat, self._palette.expand(b, -1, -1)).argmin(-1)  # (B, P)
        hist = torch.stack([torch.bincount(n, minlength=self.embed_dim) for n in nearest]).float()
        hist = hist + 0.01  # no zero vectors
        return (hist / hist.norm(dim=1, keepdim=True)).numpy().astype(np.float32)

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        out = np.full((len(texts), self.embed_dim), 0.01, dtype=np.float32)
        for i, t in enumerate(texts):
            for word in t.lower().replace(",", " ").split():
                if word in PALETTE:
                    out[i, NAMES.index(word)] += 1.0
        return out / np.linalg.norm(out, axis=1, keepdims=True)


# (file name, top colour, bottom colour, camera, person id): two-colour "pedestrians"
GALLERY = [
    ("p00.png", "red", "black", "c1", 1),
    ("p01.png", "red", "blue", "c2", 1),
    ("p02.png", "blue", "black", "c1", 2),
    ("p03.png", "green", "white", "c2", 3),
    ("p04.png", "yellow", "blue", "c3", 4),
    ("p05.png", "white", "black", "c1", 5),
    ("p06.png", "orange", "green", "c3", 6),
    ("p07.png", "purple", "white", "c2", 7),
    ("p08.png", "red", "red", "c3", 8),
    ("p09.jpg", "black", "yellow", "c1", 9),
]


def make_gallery(root: Path) -> tuple[Path, Path]:
    """Write GALLERY as 24x48 images (top half, bottom half) and a metadata CSV."""
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    for name, top, bottom, _, _ in GALLERY:
        im = Image.new("RGB", (24, 48), PALETTE[top])
        im.paste(Image.new("RGB", (24, 24), PALETTE[bottom]), (0, 24))
        im.save(images / name)
    meta = root / "metadata.csv"
    with meta.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", "camera", "person_id"])
        for name, _, _, cam, pid in GALLERY:
            w.writerow([name, cam, pid])
    return images, meta


def open_gallery_index(root: Path, encoder):
    """Build the test gallery under ``root`` into a real index and open it."""
    from tbps.index import GalleryIndex, build_index

    images, meta = make_gallery(root)
    build_index(root / "index", encoder, images, metadata_csv=meta, progress=False)
    return GalleryIndex.open(root / "index")


@pytest.fixture(scope="module")
def encoder():
    return ColourEncoder()


@pytest.fixture(scope="module")
def index(tmp_path_factory, encoder):
    return open_gallery_index(tmp_path_factory.mktemp("gallery"), encoder)


@pytest.fixture()
def client(index, encoder):
    with TestClient(create_app(index, encoder)) as c:
        yield c


def naive_ranking(encoder, index, text: str, camera: str | None = None) -> list[tuple[int, float]]:
    """Every gallery item scored by a plain dot product, best first (ties by id)."""
    q = encoder.encode_texts([text])[0]
    rows = []
    for i in range(len(index)):
        h = index.get(i)
        if camera is not None and h.metadata["camera"] != camera:
            continue
        feat = encoder.encode_images(encoder.preprocess(Image.open(h.path)).unsqueeze(0))[0]
        rows.append((i, float(q @ feat)))
    return sorted(rows, key=lambda r: (-r[1], r[0]))


def assert_same_ranking(got, ref, tol=1e-5):
    """``got`` is the head of the full ranking ``ref``: same scores in the same order, and
    the same ids except among tied scores."""
    assert len(got) <= len(ref)
    assert [s for _, s in got] == pytest.approx([s for _, s in ref[: len(got)]], abs=tol)
    for (gi, gs), (ri, rs) in zip(got, ref):
        if gi != ri:
            tied = {i for i, s in ref if abs(s - gs) <= tol}
            assert gi in tied and ri in tied, (got, ref)


def _name(index, item_id) -> str:
    return Path(index.get(item_id).path).name


# ---- search -----------------------------------------------------------------------------


def test_search_matches_naive_ranking(client, index, encoder):
    r = client.post("/search", json={"text": "a man in a red coat", "k": 4})
    assert r.status_code == 200, r.text
    body = r.json()
    ref = naive_ranking(encoder, index, "a man in a red coat")
    got = [(h["id"], h["score"]) for h in body["results"]]
    assert len(got) == 4
    assert_same_ranking(got, ref)
    assert [h["rank"] for h in body["results"]] == [1, 2, 3, 4]
    # the all-red person first, then the two half-red ones
    assert _name(index, got[0][0]) == "p08.png"
    assert {_name(index, i) for i, _ in got[1:3]} == {"p00.png", "p01.png"}
    first = body["results"][0]
    assert first["image_url"] == f"/images/{first['id']}" and first["thumb_url"] == f"/thumbs/{first['id']}"
    assert first["name"] == "p08.png" and first["metadata"]["camera"] == "c3"
    assert "/" not in first["name"]  # no server path leaks
    assert body["k"] == 4 and body["query"] == "a man in a red coat" and body["took_ms"] >= 0


def test_filters_as_string_and_as_object(client, index, encoder):
    ref = naive_ranking(encoder, index, "black", camera="c1")
    a = client.post("/search", json={"text": "black", "k": 10, "filters": "camera = 'c1'"})
    b = client.post("/search", json={"text": "black", "k": 10, "filters": {"camera": "c1"}})
    assert a.status_code == 200 and b.status_code == 200, (a.text, b.text)
    assert len(a.json()["results"]) == len(ref) == 4
    assert_same_ranking([(h["id"], h["score"]) for h in a.json()["results"]], ref)
    assert a.json()["results"] == b.json()["results"]
    assert b.json()["where"] == "camera = 'c1'"
    # numbers stay numbers; quotes in values are escaped, not executed
    c = client.post("/search", json={"text": "red", "filters": {"person_id": 1, "camera": "c2"}})
    assert [_name(index, h["id"]) for h in c.json()["results"]] == ["p01.png"]
    d = client.post("/search", json={"text": "red", "filters": {"camera": "x' OR '1'='1"}})
    assert d.status_code == 200 and d.json()["results"] == []


def test_k_above_gallery_is_clamped(client, index):
    r = client.post("/search", json={"text": "blue", "k": MAX_K})
    assert r.status_code == 200
    assert r.json()["k"] == len(index) and len(r.json()["results"]) == len(index)
    scores = [h["score"] for h in r.json()["results"]]
    assert scores == sorted(scores, reverse=True)


BAD_JSON_BODIES = [
    ({"text": ""}, "text"),
    ({"text": "   \t\n "}, "empty or only whitespace"),
    ({"text": "x" * 100_000}, f"at most {MAX_QUERY_CHARS} characters"),
    ({"text": "red", "k": 0}, "k"),
    ({"text": "red", "k": -3}, "k"),
    ({"text": "red", "k": MAX_K + 1}, "k"),
    ({"text": "red", "k": "ten"}, "k"),
    ({"text": "red", "k": 2.5}, "k"),
    ({"text": "red", "filters": "colour = 'red'"}, "colour"),
    ({"text": "red", "filters": {"colour": "red"}}, "filters"),
    ({"text": "red", "filters": "camera = 'c1"}, "unterminated"),
    ({"text": "red", "filters": "camera = 'c1'; DROP TABLE items"}, "filters"),
    ({"text": "red", "filters": {"camera": ["c1", "c2"]}}, "filters"),
    ({"query": "red"}, "text"),
    ({"text": None}, "text"),
    ([1, 2, 3], "body"),
    ("red", "body"),
]


@pytest.mark.parametrize("body,needle", BAD_JSON_BODIES, ids=[str(i) for i in range(len(BAD_JSON_BODIES))])
def test_bad_search_input_gets_a_clear_422(client, body, needle):
    r = client.post("/search", json=body)
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert isinstance(detail, str) and needle in detail, detail
    assert len(r.text) < 5000  # the 100k query is not echoed back


@pytest.mark.parametrize(
    "raw,status,needle",
    [
        (b'{"text": "red", "k": 3', 422, "not valid JSON"),
        (b"{'text': 'red'}", 422, "not valid JSON"),
        (b"", 422, "body"),
        (b'{"text": "caf\xe9 \xff\xfe"}', 400, "error parsing the body"),
    ],
)
def test_malformed_bodies(client, raw, status, needle):
    r = client.post("/search", content=raw, headers={"Content-Type": "application/json"})
    assert r.status_code == status, r.text
    assert needle in r.json()["detail"]


def test_search_by_image(client, index, encoder):
    buf = io.BytesIO()
    Image.new("RGB", (20, 40), PALETTE["red"]).save(buf, "PNG")
    r = client.post("/search/image", files={"file": ("me.png", buf.getvalue(), "image/png")}, data={"k": "3"})
    assert r.status_code == 200, r.text
    q = encoder.encode_images(encoder.preprocess(Image.open(io.BytesIO(buf.getvalue()))).unsqueeze(0))[0]
    ref = sorted(((i, float(q @ index_feat(encoder, index, i))) for i in range(len(index))), key=lambda r: (-r[1], r[0]))
    assert len(r.json()["results"]) == 3
    assert_same_ranking([(h["id"], h["score"]) for h in r.json()["results"]], ref)
    assert r.json()["query"] == "me.png"
    bad = client.post("/search/image", files={"file": ("x.png", b"not an image", "image/png")})
    assert bad.status_code == 400 and "not a readable image" in bad.json()["detail"]
    assert client.post("/search/image", files={"file": ("e.png", b"", "image/png")}).status_code == 400
    assert client.post("/search/image", data={"k": "3"}).status_code == 422
    r = client.post("/search/image", files={"file": ("me.png", buf.getvalue(), "image/png")}, data={"k": "0"})
    assert r.status_code == 422


def index_feat(encoder, index, i):
    return encoder.encode_images(encoder.preprocess(Image.open(index.get(i).path)).unsqueeze(0))[0]


# ---- images -----------------------------------------------------------------------------


def test_images_are_served_by_id_only(client, index):
    path = Path(index.get(3).path)
    r = client.get("/images/3")
    assert r.status_code == 200 and r.content == path.read_bytes()
    assert r.headers["content-type"] == "image/png"
    for bad, status in [
        ("/images/999", 404),
        ("/images/-1", 422),
        ("/images/abc", 422),
        (f"/images/{2**70}", 404),
        ("/images/..%2F..%2Fetc%2Fpasswd", 404),
        ("/images/%2Fetc%2Fpasswd", 404),
        ("/thumbs/999", 404),
    ]:
        r = client.get(bad)
        assert r.status_code == status, (bad, r.status_code, r.text)
        assert "passwd" not in r.text or r.status_code == 404


def test_thumbnails_are_small_jpegs_and_cached(client, index):
    r = client.get("/thumbs/9")
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    im = Image.open(io.BytesIO(r.content))
    assert im.format == "JPEG"
    src = Image.open(index.get(9).path)
    assert im.width <= THUMB_BOX[0] and im.height <= THUMB_BOX[1]
    assert im.height / im.width == pytest.approx(src.height / src.width, rel=0.05)
    # top half black, bottom half yellow survives the resize
    px = np.asarray(im.convert("RGB"), dtype=float)
    assert px[: im.height // 4].mean() < 40 and px[-im.height // 4 :, :, 2].mean() < 90
    thumbs = client.app.state.thumbs
    hits = thumbs.hits
    assert client.get("/thumbs/9").content == r.content
    assert thumbs.hits == hits + 1


def test_thumb_cache_is_lru():
    cache, made = ThumbCache(2), []

    def maker(key):
        return lambda: made.append(key) or f"img{key}".encode()

    for key in [1, 2, 1, 3, 1, 2]:
        assert cache.get(key, maker(key)) == f"img{key}".encode()
    # 1 stays hot; 2 is evicted by 3, so it is made again
    assert made == [1, 2, 3, 2] and len(cache) == 2


def test_missing_file_on_disk_is_404(tmp_path, encoder):
    idx = open_gallery_index(tmp_path, encoder)
    Path(idx.get(0).path).unlink()
    with TestClient(create_app(idx, encoder)) as c:
        assert c.get("/images/0").status_code == 404
        r = c.get("/thumbs/0")
        assert r.status_code == 404 and "gone" in r.json()["detail"]


# ---- auth -------------------------------------------------------------------------------


def test_token_guards_everything_but_health(index, encoder):
    token = "s3cret-token"
    with TestClient(create_app(index, encoder, token=token)) as c:
        assert c.get("/health").status_code == 200
        for method, url, kw in [
            ("get", "/stats", {}),
            ("post", "/search", {"json": {"text": "red"}}),
            ("get", "/images/0", {}),
            ("get", "/thumbs/0", {}),
            ("get", "/", {}),
            ("get", "/static/app.js", {}),
            ("get", "/openapi.json", {}),
            ("get", "/docs", {}),
        ]:
            r = getattr(c, method)(url, **kw)
            if url == "/docs":
                assert r.status_code == 404  # no Swagger UI: it would load assets from a CDN
                continue
            assert r.status_code == 401, url
            assert "token" in r.json()["detail"] and r.headers["www-authenticate"] == "Bearer"
            r = getattr(c, method)(url, headers={"Authorization": "Bearer wrong"}, **kw)
            assert r.status_code == 401 and r.json()["detail"] == "wrong token"
        auth = {"Authorization": f"Bearer {token}"}
        assert c.post("/search", json={"text": "red"}, headers=auth).status_code == 200
        assert c.get("/images/0", params={"token": token}).status_code == 200
        assert c.get("/stats", headers={"Authorization": "Basic abc"}).status_code == 401
        # non-ASCII junk in the header is a 401, not a crash
        assert c.get("/stats", headers={"Authorization": "Bearer \xe9\xe9".encode("latin-1")}).status_code == 401
        # opening the page with ?token= sets an HttpOnly cookie that then authenticates alone
        page = c.get("/", params={"token": token})
        assert page.status_code == 200 and "<title>" in page.text
        cookie = page.headers["set-cookie"]
        assert "tbps_token=" in cookie and "HttpOnly" in cookie and "SameSite=strict" in cookie
        assert c.get("/thumbs/0").status_code == 200  # the client kept the cookie
        # a stale cookie does not hide a good header
        c.cookies.clear()
        c.cookies.set("tbps_token", "old")
        assert c.get("/stats").status_code == 401
        assert c.get("/stats", headers=auth).status_code == 200


# ---- stats, schema, page ----------------------------------------------------------------


def test_health_stats_and_schema(client, index, encoder):
    assert client.get("/health").json()["status"] == "ok"
    s = client.get("/stats").json()
    assert s["items"] == len(index) and s["embed_dim"] == encoder.embed_dim
    assert set(s["columns"]) >= {"camera", "person_id"} and s["auth"] is False
    assert s["model"]["arch"] == "colour-histogram"
    schema = client.get("/openapi.json").json()
    search = schema["paths"]["/search"]["post"]
    assert {"200", "400", "422"} <= set(search["responses"])
    req = schema["components"]["schemas"]["SearchRequest"]
    assert req["properties"]["text"]["maxLength"] == MAX_QUERY_CHARS
    assert req["properties"]["k"]["maximum"] == MAX_K and "clamped" in req["properties"]["k"]["description"]
    assert "/" not in schema["paths"] and "/static/{name}" not in schema["paths"]


def test_page_and_static_files(client):
    page = client.get("/")
    assert page.status_code == 200 and "static/app.js" in page.text and "static/style.css" in page.text
    assert "http://" not in page.text and "https://" not in page.text  # no external assets
    for name in ["app.js", "style.css", "favicon.svg"]:
        r = client.get(f"/static/{name}")
        assert r.status_code == 200 and r.content, name
        assert "https://" not in r.text, name
    for bad in ["/static/index.html", "/static/..%2Fapp.py", "/static/nope.js"]:
        assert client.get(bad).status_code == 404, bad


# ---- schemathesis -----------------------------------------------------------------------

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings


def _schema_app():
    # Built at import: schemathesis needs the schema when tests are collected (its
    # from_fixture does not work with this pytest). Ten tiny images, a fraction of a second.
    root = Path(tempfile.mkdtemp(prefix="tbps-serve-schema-"))
    atexit.register(shutil.rmtree, root, True)
    return create_app(open_gallery_index(root, ColourEncoder()), ColourEncoder(), token="tok")


schema = schemathesis.openapi.from_asgi("/openapi.json", _schema_app(), headers={"Authorization": "Bearer tok"})


@schema.parametrize()
@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_api_conforms_to_its_schema(case):
    """Generated requests never get a 500, and every response matches the schema.

    Left out: "schema-valid request accepted". A filter string can be valid JSON-schema-wise
    and still not parse, and an uploaded file can be bytes that are not an image: those
    get a documented 4xx on purpose.
    """
    from schemathesis.checks import positive_data_acceptance

    case.call_and_validate(headers={"Authorization": "Bearer tok"}, excluded_checks=[positive_data_acceptance])


# ---- `tbps serve` startup errors and the real encoder -----------------------------------


def _serve(argv, capsys):
    from tbps.cli.main import main

    code = main(["serve", *argv])
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def real_gallery(tmp_path_factory):
    """A real untrained checkpoint and an index built with it (records the checkpoint)."""
    from tbps.index import build_index
    from tbps.retrieval.encoder import Encoder, create_untrained_checkpoint

    with torch_threads(1):  # restored after, for the tests that follow
        root = tmp_path_factory.mktemp("real")
        ckpt = create_untrained_checkpoint(root / "ckpt" / "best.pt", seed=0)
        encoder = Encoder.from_checkpoint(ckpt)
        images, meta = make_gallery(root)
        build_index(root / "index", encoder, images, metadata_csv=meta, progress=False, checkpoint=ckpt)
        yield root / "index", ckpt, encoder


def test_serve_refuses_a_missing_or_corrupt_index(tmp_path, capsys):
    code, err = _serve([str(tmp_path / "nope")], capsys)
    assert code == 2 and err.startswith("tbps: error:") and "does not exist" in err and "Traceback" not in err
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "manifest.json").write_text("{not json")
    code, err = _serve([str(bad)], capsys)
    assert code == 2 and "corrupt index manifest" in err
    code, err = _serve([str(bad), "--port", "70000"], capsys)
    assert code == 2 and "--port" in err


def test_serve_refuses_a_bad_checkpoint(real_gallery, tmp_path, capsys):
    from tbps.retrieval.encoder import create_untrained_checkpoint

    index_dir, _, _ = real_gallery
    code, err = _serve([str(index_dir), "--checkpoint", str(tmp_path / "missing.pt"), "--port", "0"], capsys)
    assert code == 2 and err.startswith("tbps: error:") and "missing.pt" in err
    other = create_untrained_checkpoint(tmp_path / "other.pt", seed=1)
    code, err = _serve([str(index_dir), "--checkpoint", str(other), "--port", "0"], capsys)
    assert code == 2 and "checkpoint" in err and "Traceback" not in err


def test_serve_refuses_a_busy_port(real_gallery, capsys):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        code, err = _serve([str(real_gallery[0]), "--port", str(port)], capsys)
    assert code == 2 and f"127.0.0.1:{port}" in err and "--port" in err


def test_end_to_end_with_a_real_checkpoint(real_gallery):
    """`tbps serve`'s app loader on a real (untrained) model: ranking = naive dot products."""
    from tbps.cli.serve import load_app

    index_dir, _, encoder = real_gallery
    app = load_app(index_dir)  # finds the checkpoint recorded in the index
    with TestClient(app) as c:
        r = c.post("/search", json={"text": "a man in a red coat and black trousers", "k": 5})
        assert r.status_code == 200, r.text
        q = encoder.encode_texts(["a man in a red coat and black trousers"])[0]
        ix = app.state.live.get()
        ref = sorted(((i, float(q @ index_feat(encoder, ix, i))) for i in range(len(ix))), key=lambda t: (-t[1], t[0]))
        assert len(r.json()["results"]) == 5
        assert_same_ranking([(h["id"], h["score"]) for h in r.json()["results"]], ref, tol=1e-4)
        assert c.get("/stats").json()["model"]["arch"] == encoder.fingerprint["arch"]
        # odd but valid text reaches the real tokenizer without a crash
        for text in ["!!!", "a\x00b", "😀 red 👕", "<script>alert(1)</script>", "ذهب أحمر", "\u202e\ufeffred"]:
            r = c.post("/search", json={"text": text, "k": 2})
            assert r.status_code == 200 and len(r.json()["results"]) == 2, (text, r.text)
        # a 1,000-character query is accepted (the tokenizer truncates it), 1,001 is not
        assert c.post("/search", json={"text": "red " * 250, "k": 1}).status_code == 200
        assert c.post("/search", json={"text": "x" * 1001, "k": 1}).status_code == 422


class HeldEncoder(ColourEncoder):
    """A ColourEncoder whose next ``encode_texts``, once ``hold(batcher, n)`` is called, waits
    until ``n`` queries have reached the batcher: the call's own and those queued behind it.
    ``held`` is set when that call has begun (its texts are in the encoder)."""

    def __init__(self):
        self.calls: list[int] = []  # texts per call
        self.batcher, self.expected = None, 0
        self.held = threading.Event()

    def hold(self, batcher, n: int) -> None:
        self.batcher, self.expected = batcher, n
        self.held.clear()

    def encode_texts(self, texts):
        if self.expected:
            self.held.set()
            deadline = time.monotonic() + 30  # only reached if the queries never all arrive
            while len(texts) + self.batcher.waiting < self.expected and time.monotonic() < deadline:
                time.sleep(0.005)
            self.expected = 0
        self.calls.append(len(texts))
        return super().encode_texts(texts)


def test_concurrent_text_queries_are_batched(index, encoder):
    """Many threads at once: every answer equals the answer alone; the model saw batches."""
    import math
    from concurrent.futures import ThreadPoolExecutor

    texts = [f"{a} {b}" for a in NAMES for b in NAMES][:48]
    held, n, max_batch = HeldEncoder(), 24, 32
    with TestClient(create_app(index, held, max_batch=max_batch)) as c:
        alone = {t: c.post("/search", json={"text": t, "k": 3}).json()["results"] for t in texts[:6]}
        before = c.get("/stats").json()["text_batches"]
        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(lambda t: (t, c.post("/search", json={"text": t, "k": 3})), texts))
        after = c.get("/stats").json()["text_batches"]
        # Arranged batching: the first encoder call is held until all n concurrent queries are
        # queued behind it, so the rest go in full batches: 1 + ceil((n - 1) / max_batch) calls.
        calls0 = len(held.calls)
        held.hold(c.app.state.batcher, n)
        with ThreadPoolExecutor(n) as pool:
            arranged = list(pool.map(lambda t: (t, c.post("/search", json={"text": t, "k": 3})), texts[-n:]))
        calls = held.calls[calls0:]
        final = c.get("/stats").json()["text_batches"]
    assert all(r.status_code == 200 for _, r in answers + arranged)
    refs = {t: naive_ranking(encoder, index, t) for t in texts}
    for t, r in answers + arranged:
        ref = refs[t]
        assert_same_ranking([(h["id"], h["score"]) for h in r.json()["results"]], ref)
        if t in alone:
            assert [h["id"] for h in r.json()["results"]] == [h["id"] for h in alone[t]]
    assert after["queries"] - before["queries"] == len(texts)
    assert sum(calls) == n and len(calls) <= 1 + math.ceil((n - 1) / max_batch) < n, calls
    assert final["batches"] - after["batches"] == len(calls) and final["queries"] - after["queries"] == n


def test_text_batcher_groups_waiting_queries_and_passes_errors():
    import threading

    calls = []
    gate = threading.Event()

    def encode(texts):
        gate.wait(5)
        calls.append(list(texts))
        if "boom" in texts:
            raise RuntimeError("boom")
        return np.array([[len(t)] for t in texts], dtype=np.float32)

    from tbps.serve.runtime import TextBatcher

    b = TextBatcher(encode, threading.Lock(), max_batch=4)
    out = {}
    threads = [threading.Thread(target=lambda t=t: out.__setitem__(t, b(t))) for t in ["a", "bb", "ccc", "dddd", "eeeee"]]
    for th in threads:
        th.start()
    time.sleep(0.3)  # all five queued while the first call waits at the gate
    gate.set()
    for th in threads:
        th.join(5)
    assert {t: float(v[0]) for t, v in out.items()} == {t: float(len(t)) for t in ["a", "bb", "ccc", "dddd", "eeeee"]}
    assert sorted(len(c) for c in calls) in ([1, 4], [1, 1, 3], [1, 2, 2], [2, 3], [1, 1, 1, 2])
    assert max(len(c) for c in calls) <= 4 and len(calls) < 5
    with pytest.raises(RuntimeError, match="boom"):
        b("boom")
    b.close()
    assert b("again")[0] == 5.0  # restarts after close
    b.close()


def test_oversized_bodies_are_refused_before_parsing(client):
    from tbps.serve.schemas import MAX_BODY_BYTES, MAX_UPLOAD_BYTES

    big = b'{"text": "' + b"x" * MAX_BODY_BYTES + b'"}'
    r = client.post("/search", content=big, headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and "larger than" in r.json()["detail"]
    # a chunked body (no Content-Length) is cut off while streaming: still a 4xx
    r = client.post("/search", content=iter([big[i : i + 65536] for i in range(0, len(big), 65536)]),
                    headers={"Content-Type": "application/json"})
    assert 400 <= r.status_code < 500, r.status_code
    up = b"\xff" * (MAX_UPLOAD_BYTES + 100_000)
    r = client.post("/search/image", files={"file": ("big.jpg", up, "image/jpeg")})
    assert r.status_code == 413
    # just under the upload limit: read, then refused for what it is
    r = client.post("/search/image", files={"file": ("junk.jpg", b"\xff" * 1000, "image/jpeg")})
    assert r.status_code == 400


def test_a_new_index_generation_is_served_without_restart(tmp_path, encoder):
    """`tbps index add` while serving: the next request sees the new image; a damaged
    manifest afterwards leaves the last good generation in service."""
    from tbps.index import add_to_index

    idx = open_gallery_index(tmp_path, encoder)
    n = len(idx)
    with TestClient(create_app(idx, encoder, reload_interval=0.0)) as c:
        assert c.get("/stats").json()["items"] == n
        Image.new("RGB", (24, 48), PALETTE["orange"]).save(tmp_path / "images" / "p10.png")
        add_to_index(tmp_path / "index", encoder, tmp_path / "images", progress=False)
        r = c.post("/search", json={"text": "orange", "k": 1})
        top = r.json()["results"][0]
        assert top["name"] == "p10.png"
        assert c.get(top["image_url"]).content == (tmp_path / "images" / "p10.png").read_bytes()
        s = c.get("/stats").json()
        assert s["items"] == n + 1 and s["reloads"] == {"count": 1, "error": None}
        (tmp_path / "index" / "manifest.json").write_text("{broken")
        r = c.post("/search", json={"text": "orange", "k": 1})
        assert r.status_code == 200 and r.json()["results"][0]["name"] == "p10.png"
        s = c.get("/stats").json()
        assert s["items"] == n + 1 and "corrupt index manifest" in s["reloads"]["error"]


def test_serve_command_starts_uvicorn_on_localhost(real_gallery, monkeypatch, capsys):
    """The happy path of `tbps serve`, with uvicorn.run replaced by a recorder."""
    import uvicorn

    calls = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: calls.append((app, kw)))
    monkeypatch.setenv("TBPS_TOKEN", "env-token")
    code, err = _serve([str(real_gallery[0]), "--port", "0", "--log-level", "warning"], capsys)
    assert code == 0 and len(calls) == 1, err
    app, kw = calls[0]
    assert kw["host"] == "127.0.0.1" and kw["port"] == 0 and kw["log_level"] == "warning"
    assert f"serving {len(GALLERY)} images" in err and "?token=" in err and "warning" not in err
    with TestClient(app, base_url="http://127.0.0.1:8000") as c:  # the token came from $TBPS_TOKEN
        assert c.get("/stats").status_code == 401
        assert c.get("/stats", headers={"Authorization": "Bearer env-token"}).status_code == 200
        assert c.get("/health", headers={"Host": "rebound.example"}).status_code == 421  # DNS rebinding guard
    assert "tbps_redact_token" in kw["log_config"]["loggers"]["uvicorn.access"]["filters"]
    monkeypatch.delenv("TBPS_TOKEN")
    code, err = _serve([str(real_gallery[0]), "--port", "0", "--host", "0.0.0.0"], capsys)
    assert code == 0 and "without a token" in err and calls[-1][1]["host"] == "0.0.0.0"
    code, err = _serve([str(real_gallery[0]), "--port", "0", "--max-batch", "0"], capsys)
    assert code == 2 and "--max-batch" in err


def test_serve_command_picks_the_http_parser_and_event_loop(real_gallery, monkeypatch, capsys):
    """--http and --loop reach uvicorn as given (auto: uvicorn takes httptools and uvloop when
    installed); asking for one that is not installed is one line, before the model loads."""
    import importlib.util

    import uvicorn

    calls = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: calls.append(kw))
    code, err = _serve([str(real_gallery[0]), "--port", "0"], capsys)
    assert code == 0 and (calls[-1]["http"], calls[-1]["loop"]) == ("auto", "auto"), err
    code, err = _serve([str(real_gallery[0]), "--port", "0", "--http", "h11", "--loop", "asyncio"], capsys)
    assert code == 0 and (calls[-1]["http"], calls[-1]["loop"]) == ("h11", "asyncio"), err
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "uvloop" else find_spec(name, *a))
    code, err = _serve([str(real_gallery[0]), "--port", "0", "--loop", "uvloop"], capsys)
    assert code == 2 and len(calls) == 2 and "--loop uvloop: uvloop is not installed" in err
    assert len(err.strip().splitlines()) == 1, err


def test_serve_command_with_a_rerank(real_gallery, monkeypatch, capsys):
    """--rerank jaccard: the served ranking is tbps.retrieval.rerank's over the index's candidates."""
    import uvicorn

    from tbps.retrieval.rerank import METHODS, index_reranker

    apps = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: apps.append(app))
    code, err = _serve([str(real_gallery[0]), "--port", "0", "--rerank", "jaccard", "--rerank-depth", "8"], capsys)
    assert code == 0, err
    encoder, ix = real_gallery[2], apps[0].state.live.get()
    text = "a woman in a green coat"
    want = ix.search(encoder.encode_texts([text]), k=5, reranker=index_reranker("jaccard"), rerank_depth=8)[0]
    with TestClient(apps[0], base_url="http://localhost:8000") as c:
        got = c.post("/search", json={"text": text, "k": 5}).json()["results"]
    assert [h["id"] for h in got] == [h.id for h in want]
    assert [h["score"] for h in got] == pytest.approx([h.score for h in want], abs=1e-5)
    # the CLI's spelled-out choices are tbps.retrieval.rerank's methods
    from tbps.cli.main import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command").choices["serve"]
    assert tuple(next(a for a in sub._actions if a.dest == "rerank").choices) == METHODS


def test_a_reranker_reorders_the_candidates(index, encoder):
    """The re-scoring hook: a reranker that negates scores over the whole gallery puts the
    worst first-stage matches on top."""
    seen = []

    def negate(query_feats, cand_ids, cand_scores, ix):
        seen.append(cand_ids.shape)
        return -cand_scores

    with TestClient(create_app(index, encoder, reranker=negate, rerank_depth=len(index))) as c:
        r = c.post("/search", json={"text": "red", "k": 3})
    assert r.status_code == 200 and seen == [(1, len(index))]
    worst = naive_ranking(encoder, index, "red")[::-1]
    got = [(h["id"], -h["score"]) for h in r.json()["results"]]
    assert_same_ranking(got, worst)


class SynonymEncoder(ColourEncoder):
    """Reads "scarlet" as red, and says so, as a frozen word-dictionary checkpoint does."""

    def encode_texts(self, texts):
        return super().encode_texts([t.replace("scarlet", "red") for t in texts])

    def unknown_words(self, text):
        return {"scarlet": [("red", 1.0)]} if "scarlet" in text else {}


def test_search_shows_how_unseen_words_were_read(client, index):
    with TestClient(create_app(index, SynonymEncoder())) as c:
        body = c.post("/search", json={"text": "a man in a scarlet coat", "k": 4}).json()
        plain = c.post("/search", json={"text": "a man in a red coat", "k": 4}).json()
    assert body["unknown_words"] == {"scarlet": {"red": 1.0}} and plain["unknown_words"] == {}
    assert [h["id"] for h in body["results"]] == [h["id"] for h in plain["results"]]
    # An encoder without the method (this module's ColourEncoder) answers {}.
    assert client.post("/search", json={"text": "a man in a scarlet coat", "k": 4}).json()["unknown_words"] == {}
