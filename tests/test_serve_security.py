"""Serving an untrusted gallery: DNS rebinding, files replaced or disguised, decompression bombs,
the token kept out of logs, security headers, and errors that keep the connection."""

from __future__ import annotations

import http.client
import io
import json
import logging
import os
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient

from tbps.serve import create_app
from tests.test_images import png_header
from tests.test_serve import ColourEncoder, open_gallery_index


@pytest.fixture(scope="module")
def encoder():
    return ColourEncoder()


@pytest.fixture()
def gallery(tmp_path, encoder):
    return open_gallery_index(tmp_path, encoder)


def _id_of(index, name: str) -> int:
    return next(int(i) for i in index.ids if Path(index.get(int(i)).path).name == name)


def test_host_header_must_name_the_server(gallery, encoder):
    from tbps.cli.serve import allowed_hosts

    app = create_app(gallery, encoder, allowed_hosts=allowed_hosts("127.0.0.1"))  # what `tbps serve` builds
    with TestClient(app) as c:
        for host in ("127.0.0.1:8000", "localhost:8000", "[::1]:8000", "localhost"):
            assert c.get("/stats", headers={"Host": host}).status_code == 200, host
        for host in ("evil.example", "evil.example:8000", "127.0.0.1.evil.example", ""):
            r = c.get("/stats", headers={"Host": host})
            assert r.status_code == 421 and "--allow-host" in r.json()["detail"], host
            assert "items" not in r.text
        assert c.post("/search", json={"text": "red"}, headers={"Host": "evil.example"}).status_code == 421
    with TestClient(create_app(gallery, encoder, allowed_hosts=allowed_hosts("127.0.0.1", ["Gallery.LAN"]))) as c:
        assert c.get("/stats", headers={"Host": "gallery.lan:8000"}).status_code == 200
        assert c.get("/stats", headers={"Host": "evil.example"}).status_code == 421


def test_security_headers_on_every_response(gallery, encoder):
    with TestClient(create_app(gallery, encoder)) as c:
        for r in (c.get("/"), c.post("/search", json={"text": "red"}), c.get("/images/0"), c.get("/nope")):
            assert r.headers["x-content-type-options"] == "nosniff"
            assert r.headers["x-frame-options"] == "DENY"
            assert "default-src" in r.headers["content-security-policy"]
        page = c.get("/")
        assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
        assert "sandbox" in c.get("/images/0").headers["content-security-policy"]


def test_a_jpeg_named_html_is_served_as_a_jpeg(tmp_path, encoder):
    from tbps.index import GalleryIndex, build_index

    images = tmp_path / "images"
    images.mkdir()
    buf = io.BytesIO()
    Image.new("RGB", (16, 32), (200, 10, 10)).save(buf, "JPEG")
    payload = buf.getvalue() + b"<html><script>alert(document.cookie)</script></html>"
    (images / "x.html").write_bytes(payload)
    build_index(tmp_path / "idx", encoder, images, workers=0, progress=False)
    with GalleryIndex.open(tmp_path / "idx") as ix, TestClient(create_app(ix, encoder)) as c:
        r = c.get("/images/0")
        assert r.status_code == 200 and r.content == payload
        assert r.headers["content-type"] == "image/jpeg"  # by content, not by the .html name
        assert r.headers["x-content-type-options"] == "nosniff"


def test_files_replaced_after_indexing_are_not_served(gallery, encoder, tmp_path):
    secret = tmp_path / "passwd"
    secret.write_text("root:x:0:0:root:/root:/bin/bash\n")
    p0 = Path(gallery.get(0).path)
    p0.unlink()
    p0.symlink_to(secret)  # an indexed file replaced by a link out of the gallery
    p1 = Path(gallery.get(1).path)
    data = bytearray(p1.read_bytes())
    data[-20] ^= 0xFF  # same size, other content
    p1.write_bytes(bytes(data))
    p2 = Path(gallery.get(2).path)
    p2.write_bytes(p2.read_bytes() + b"\0" * 10)  # grown
    with TestClient(create_app(gallery, encoder)) as c:
        for url in ("/images/0", "/thumbs/0"):
            r = c.get(url)
            assert r.status_code == 404 and "link" in r.json()["detail"] and "root:" not in r.text, url
        for i in (1, 2):
            for url in (f"/images/{i}", f"/thumbs/{i}"):
                r = c.get(url)
                assert r.status_code == 404 and "changed" in r.json()["detail"], (url, r.text)
        assert c.get("/images/3").status_code == 200 and c.get("/thumbs/3").status_code == 200


def test_a_folder_replaced_by_a_link_is_not_followed(tmp_path, encoder):
    from tbps.index import GalleryIndex, build_index

    images = tmp_path / "images" / "cam1"
    images.mkdir(parents=True)
    Image.new("RGB", (16, 32), (200, 10, 10)).save(images / "a.png")
    build_index(tmp_path / "idx", encoder, tmp_path / "images", recursive=True, workers=0, progress=False)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (images / "a.png").rename(elsewhere / "a.png")  # same bytes, reached through a link now
    images.rmdir()
    images.symlink_to(elsewhere)
    with GalleryIndex.open(tmp_path / "idx") as ix, TestClient(create_app(ix, encoder)) as c:
        assert c.get("/images/0").status_code == 404


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_upload_bombs_are_refused_with_413(gallery, encoder):
    with TestClient(create_app(gallery, encoder)) as c:
        for w, h in ((6000, 5000), (12000, 8000), (30000, 30000)):
            r = c.post("/search/image", files={"file": ("bomb.png", png_header(w, h), "image/png")})
            assert r.status_code == 413, (w, h, r.text)
            assert "too large" in r.json()["detail"]
        ok = io.BytesIO()
        Image.new("RGB", (24, 48), (220, 30, 30)).save(ok, "PNG")
        assert c.post("/search/image", files={"file": ("ok.png", ok.getvalue())}).status_code == 200


def test_concurrent_decodes_are_bounded(gallery, encoder):
    busy, peak, lock = [0], [0], threading.Lock()

    class Slow(ColourEncoder):
        def preprocess(self, image):
            with lock:
                busy[0] += 1
                peak[0] = max(peak[0], busy[0])
            time.sleep(0.05)
            with lock:
                busy[0] -= 1
            return super().preprocess(image)

    buf = io.BytesIO()
    Image.new("RGB", (24, 48), (30, 60, 210)).save(buf, "PNG")
    with TestClient(create_app(gallery, Slow(), decode_slots=2)) as c:
        def upload():
            assert c.post("/search/image", files={"file": ("q.png", buf.getvalue())}).status_code == 200

        threads = [threading.Thread(target=upload) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert peak[0] == 2  # 8 uploads at once, never more than 2 decoding


def test_stats_shows_no_server_paths(gallery, encoder, tmp_path):
    with TestClient(create_app(gallery, encoder)) as c:
        body = c.get("/stats").text
    assert str(tmp_path) not in body and os.sep + "images" not in body
    assert json.loads(body)["index"]["path"] == "index"


def test_browser_without_token_gets_a_token_page(gallery, encoder):
    with TestClient(create_app(gallery, encoder, token="s3cret")) as c:
        r = c.get("/", headers={"Accept": "text/html,application/xhtml+xml"})
        assert r.status_code == 401 and r.headers["content-type"].startswith("text/html")
        assert '<input name="token"' in r.text and "s3cret" not in r.text
        api = c.get("/stats")
        assert api.status_code == 401 and "token" in api.json()["detail"]
        assert c.post("/search", json={"text": "red"}, headers={"Accept": "text/html"}).status_code == 401


@pytest.fixture()
def live_server(gallery, encoder):
    """A real uvicorn server on a free port (keep-alive and the access log are its own)."""
    import uvicorn

    from tbps.serve.auth import access_log_config

    config = uvicorn.Config(create_app(gallery, encoder, token="s3cret"), host="127.0.0.1", port=0,
                            log_level="info", lifespan="on", log_config=access_log_config())  # as `tbps serve`
    server = uvicorn.Server(config)
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    deadline = time.time() + 20
    while not server.started and time.time() < deadline:
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    yield port
    server.should_exit = True
    t.join(timeout=10)


def test_big_integers_are_422_on_a_kept_connection_and_the_token_is_not_logged(live_server):
    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            lines.append(record.getMessage())

    log = logging.getLogger("uvicorn.access")
    handler, level = Keep(), log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        conn = http.client.HTTPConnection("127.0.0.1", live_server, timeout=10)
        auth = {"Authorization": "Bearer s3cret", "Content-Type": "application/json"}
        sock = None
        for filters in ({"person_id": 10**30}, "person_id = 99999999999999999999999", {"person_id": -(2**63) - 1}):
            conn.request("POST", "/search", json.dumps({"text": "red", "filters": filters}), auth)
            r = conn.getresponse()
            body = r.read()
            assert r.status == 422 and b"out of range" in body, (filters, body)
            assert (r.getheader("connection") or "").lower() != "close"
            sock = sock or conn.sock
            assert conn.sock is sock  # the same connection served the next request
        conn.request("GET", "/stats?token=s3cret")
        r = conn.getresponse()
        r.read()
        assert r.status == 200 and conn.sock is sock
        conn.close()
        deadline = time.monotonic() + 10  # the access line is logged after the response is sent
        while not any("/stats" in x for x in lines) and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
    assert any("/stats?token=***" in x for x in lines), lines
    assert not any("s3cret" in x for x in lines)
