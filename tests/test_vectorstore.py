"""One contract for every ``VectorStore`` backend (the local faiss + SQLite folder and Qdrant's
local engine, both in-process): top-k against exact numpy search, filters against Python
predicates, deletes, re-adds, updates, a reopened store, counts; then Qdrant-only behaviour (what
its filters refuse, kill -9 during an add), the CLI end to end and the REST API on a Qdrant store."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tbps.index import EncoderMismatchError, FilterError, IndexFormatError, IndexInputError
from tbps.index.vectorstore import create_store, open_store, parse_store
from tests.fake_encoder import FakeEncoder

pytest.importorskip("qdrant_client")
sys.path.insert(0, os.path.dirname(__file__))
from test_index import write_images  # noqa: E402

N, D = 36, 16
FP = {"arch": "random-unit", "embed_dim": D, "checkpoint_sha256": "ab" * 32}
BACKENDS = ["local", "qdrant"]


def _name(tmp_path, backend: str) -> str:
    return str(tmp_path / "gallery.idx") if backend == "local" else f"qdrant:{tmp_path / 'gallery.qdrant'}"


def _data(seed=0):
    rng = np.random.default_rng(seed)
    feats = rng.standard_normal((N, D)).astype(np.float32)
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    recs = [{"path": f"/gallery/cam{i % 3}/img{i:03d}.jpg",
             "camera": f"c{i % 4}" if i % 7 else None,
             "person_id": i % 5, "score": i / 10, "time": f"2024-01-{i % 28 + 1:02d}"} for i in range(N)]
    return feats, recs


@pytest.fixture(scope="module", params=BACKENDS)
def store(request, tmp_path_factory):
    """A store of the 36 items, filled in two writes; read-only for the tests that use it."""
    feats, recs = _data()
    s = create_store(_name(tmp_path_factory.mktemp(request.param), request.param), dim=D, fingerprint=FP,
                     checkpoint="/ckpt/best.pt")
    ids = np.concatenate([s.add(feats[:20], recs[:20]), s.add(feats[20:], recs[20:])])
    assert ids.tolist() == list(range(N))
    yield s
    s.close()


def exact_topk(feats, ids, q, k):
    sc = feats @ q
    order = sorted(range(len(sc)), key=lambda i: (-sc[i], ids[i]))[:k]
    return [int(ids[i]) for i in order], sc[order]


def test_topk_equals_exact_search(store):
    feats, _ = _data()
    qs = np.random.default_rng(1).standard_normal((5, D)).astype(np.float32)
    qs /= np.linalg.norm(qs, axis=1, keepdims=True)
    results = store.search(qs, k=7)
    for q, hits in zip(qs, results):
        want, scores = exact_topk(feats, np.arange(N), q, 7)
        assert [h.id for h in hits] == want
        np.testing.assert_allclose([h.score for h in hits], scores, atol=1e-5)
    everything = store.search(qs[0], k=1000)[0]  # k over the gallery: all of it, best first
    assert sorted(h.id for h in everything) == list(range(N))
    hit = store.search(feats[4], k=1)[0][0]
    assert (hit.id, hit.path, hit.metadata["camera"], hit.metadata["person_id"]) == (4, "/gallery/cam1/img004.jpg", "c0", 4)
    assert store.get(4).path == hit.path and store.image_path(4) == pathlib.Path(hit.path)
    np.testing.assert_allclose(store.feature(4), feats[4], atol=1e-6)
    assert len(store) == N and store.info()["count"] == N and store.info()["dim"] == D


def test_search_many_is_search_one_query_at_a_time(store):
    """The server's batched path: each query with its own k, the same hits as ``search`` alone."""
    from tbps.index.errors import QueryError

    qs = np.random.default_rng(2).standard_normal((4, D)).astype(np.float32)
    qs /= np.linalg.norm(qs, axis=1, keepdims=True)
    ks = [1, 7, 3, 1000]
    many = store.search_many(qs, ks)
    alone = [store.search(q, k=k)[0] for q, k in zip(qs, ks)]
    assert [[(h.id, h.path, h.metadata) for h in hits] for hits in many] == \
        [[(h.id, h.path, h.metadata) for h in hits] for hits in alone]
    assert [len(hits) for hits in many] == [1, 7, 3, N]
    for bad in ([3, 0, 1, 1], [3, 3]):
        with pytest.raises(QueryError):
            store.search_many(qs, bad)


def test_reranker_sees_the_candidates(store):
    """The re-rank hook gets the top rerank_depth candidates with their stored features (what
    tbps.retrieval.rerank.index_reranker reads: index.ids, index.features) and re-orders them."""
    feats, _ = _data()
    q = feats[2] + 0.5 * feats[9]
    seen = []

    def reverse(qs, ids, scores, index):
        rows = np.searchsorted(np.asarray(index.ids), ids[0])
        np.testing.assert_allclose(np.asarray(index.features[rows]) @ qs[0], scores[0], atol=1e-5)
        seen.append(ids[0].tolist())
        return -scores

    hits = store.search(q, k=3, reranker=reverse, rerank_depth=10)[0]
    top10 = exact_topk(feats, np.arange(N), q, 10)[0]
    assert seen == [top10] and [h.id for h in hits] == top10[::-1][:3]
    assert store.image_path(hits[0].id) == pathlib.Path(f"/gallery/cam{hits[0].id % 3}/img{hits[0].id:03d}.jpg")


def _row(r):
    return r["camera"], r["person_id"], r["score"], r["time"]


FILTERS = [
    ("camera = 'c3'", lambda c, p, s, t: c == "c3"),
    ("camera != 'c1'", lambda c, p, s, t: c is not None and c != "c1"),
    ("NOT camera = 'c1'", lambda c, p, s, t: c is not None and c != "c1"),  # NULL is neither: SQL's logic
    ("NOT (camera = 'c1' OR person_id = 2)", lambda c, p, s, t: c is not None and c != "c1" and p != 2),
    ("camera IS NULL OR person_id > 3", lambda c, p, s, t: c is None or p > 3),
    ("camera IS NOT NULL AND person_id <= 1", lambda c, p, s, t: c is not None and p <= 1),
    ("person_id IN (1, 3)", lambda c, p, s, t: p in (1, 3)),
    ("camera NOT IN ('c0', 'c2')", lambda c, p, s, t: c is not None and c not in ("c0", "c2")),
    ("camera IN ('c1', 'c2') AND NOT person_id BETWEEN 1 AND 3", lambda c, p, s, t: c in ("c1", "c2") and not 1 <= p <= 3),
    ("score >= 1.5 AND score < 2.55", lambda c, p, s, t: 1.5 <= s < 2.55),
    ("score = 2.5 OR score = 3", lambda c, p, s, t: s in (2.5, 3.0)),
    ("time >= '2024-01-10' AND time < '2024-01-20'", lambda c, p, s, t: "2024-01-10" <= t < "2024-01-20"),
    ("time BETWEEN '2024-01-05' AND '2024-01-07'", lambda c, p, s, t: "2024-01-05" <= t <= "2024-01-07"),
    ("person_id = '2'", lambda c, p, s, t: p == 2),  # a quoted number against an INTEGER column
    ("id < 5 OR path = '/gallery/cam0/img033.jpg'", None),
    ({"camera": "c2", "person_id": 2}, lambda c, p, s, t: c == "c2" and p == 2),
]


@pytest.mark.parametrize("where,pred", FILTERS, ids=[str(f[0]) for f in FILTERS])
def test_filters_match_python(store, where, pred):
    feats, recs = _data()
    want = [i for i, r in enumerate(recs) if pred(*_row(r))] if pred else [0, 1, 2, 3, 4, 33]
    assert store.filter_ids(where).tolist() == want and store.count(where) == len(want)
    q = feats[7] + feats[30]
    hits = store.search(q, k=4, where=where)[0]
    assert [h.id for h in hits] == exact_topk(feats[want], np.asarray(want), q, 4)[0]


def test_unknown_columns_and_qdrant_refusals(tmp_path):
    feats, recs = _data()
    stores = {b: create_store(_name(tmp_path / b, b), dim=D, fingerprint=FP) for b in BACKENDS}
    for s in stores.values():
        s.add(feats[:6], recs[:6])
        with pytest.raises(FilterError, match="unknown column 'colour'.*known columns: id, path"):
            s.search(feats[0], k=3, where="colour = 'red'")
        with pytest.raises(FilterError, match="unknown filter column"):
            s.filter_ids({"colour": "red"})
    assert stores["local"].filter_ids("camera LIKE 'C%'").tolist() == [1, 2, 3, 4, 5]
    for where, what in [("camera LIKE 'c%'", "cannot evaluate LIKE"),
                        ("camera > 'c1'", "cannot compare text column 'camera' with >"),
                        ("person_id < 'abc'", "holds numbers")]:
        with pytest.raises(FilterError, match=what) as e:
            stores["qdrant"].search(feats[0], k=3, where=where)
        assert "\n" not in str(e.value)
    for s in stores.values():
        s.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_delete_readd_update_reopen(tmp_path, backend):
    feats, recs = _data()
    name = _name(tmp_path, backend)
    s = create_store(name, dim=D, fingerprint=FP, checkpoint="/ckpt/best.pt")
    s.add(feats, recs)
    assert s.delete([3, 5, 5, 999]) == 2 and len(s) == N - 2
    assert 3 not in [h.id for h in s.search(feats[3], k=N)[0]]
    with pytest.raises(KeyError):
        s.get(3)
    with pytest.raises(IndexInputError, match="already stored"):
        s.add(feats[:1], recs[:1])  # img000 is still there
    again = s.add(feats[[3, 5]], [recs[3], recs[5]])  # re-added: new ids, never reused ones
    assert again.tolist() == [N, N + 1]
    assert s.search(feats[5], k=1)[0][0].id == N + 1
    s.add(feats[[9]], [{"camera": "c9"}], ids=[8])  # replace item 8's vector and one field
    assert s.search(feats[9], k=2)[0][0].id in (8, 9) and s.get(8).metadata["camera"] == "c9"
    assert s.get(8).path == recs[8]["path"] and s.get(8).metadata["person_id"] == recs[8]["person_id"]
    s.update([0, 1], [{"site": "north"}, {"site": "south"}])  # a new column
    assert "site" in s.columns and s.filter_ids("site = 'north'").tolist() == [0]
    before = [(h.id, round(h.score, 5)) for h in s.search(feats[11], k=6)[0]]
    s.close()
    r = open_store(name)
    assert len(r) == N and r.info()["count"] == N and r.checkpoint == "/ckpt/best.pt"
    assert [(h.id, round(h.score, 5)) for h in r.search(feats[11], k=6)[0]] == before
    assert r.filter_ids("site = 'south'").tolist() == [1]
    assert r.add(feats[:1], [{"path": "/gallery/new.jpg"}]).tolist() == [N + 2]
    with pytest.raises(EncoderMismatchError, match="does not match"):
        r.check_encoder(FakeEncoder(embed_dim=D))
    r.check_encoder(type("E", (), {"fingerprint": dict(FP, device="cuda")})())  # device does not count
    r.close()


def test_store_names():
    assert parse_store("gallery.idx").is_local_index
    s = parse_store("qdrant://db.example:7000/people")
    assert (s.backend, s.url, s.collection) == ("qdrant", "http://db.example:7000", "people")
    assert parse_store("qdrants://db/people").url == "https://db:6333"
    assert parse_store("qdrant:some/dir").path.endswith("some/dir")
    for bad in ("qdrant://db:6333/", "qdrant://:6333/x", "qdrant:", "qdrant://db/a/b", "qdrant://db:99999/x"):
        with pytest.raises(IndexInputError):
            parse_store(bad)


# -- kill -9 during an add into the Qdrant store ------------------------------------------------
ADD_SCRIPT = """
import sys
from tbps.index.ingest import add_to_store
from tests.fake_encoder import FakeEncoder
add_to_store(sys.argv[1], FakeEncoder(embed_dim=32, seed=0), sys.argv[2], batch_size=2, workers=0, progress=False)
"""
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _paths_and_features(name) -> dict:
    with open_store(name) as s:
        return {s.get(int(i)).path: s.feature(int(i)) for i in s.filter_ids("id >= 0")}


def test_kill9_during_qdrant_add_leaves_it_searchable_and_counted(tmp_path, capsys):
    from tbps.cli.main import main
    from tbps.index.ingest import add_to_store, build_store
    from test_index import reference_features

    enc = FakeEncoder(embed_dim=32, seed=0)
    imgs = tmp_path / "imgs"
    paths = write_images(imgs, 3)
    name = f"qdrant:{tmp_path / 'q'}"
    build_store(name, enc, imgs, workers=0, progress=False)
    paths += write_images(imgs, 8, seed=7, start=100)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]),
               TBPS_STORE_TEST_HOOK="batch:2")
    proc = subprocess.Popen([sys.executable, "-c", ADD_SCRIPT, name, str(imgs)], stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, env=env, text=True)
    try:
        for line in proc.stderr:  # the hook: two batches of 2 have landed, the add is parked
            if line.startswith("tbps-store-hook batch 2"):
                break
        else:
            pytest.fail(f"the add ended before its hook (exit {proc.wait()})")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    assert main(["index", "info", name, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["count"] == info["next_id"] == 3 + 4  # what landed: two batches of 2
    with open_store(name) as s:
        hits = s.search(enc.encode_texts(["anything"]), k=100)[0]
        assert len(hits) == 7 and len({h.path for h in hits}) == 7
    st = add_to_store(name, enc, imgs, workers=0, progress=False)  # the rerun embeds only the rest
    assert (st["added"], st["unchanged"], st["count"]) == (4, 7, 11)
    got = _paths_and_features(name)
    ref = reference_features(enc, paths)
    assert sorted(got) == sorted(str(p.resolve()) for p in paths)
    for p, f in zip(paths, ref):
        np.testing.assert_allclose(got[str(p.resolve())], f, atol=1e-5)


# -- the CLI and the REST API on a Qdrant store -------------------------------------------------
@pytest.fixture()
def two_stores(tmp_path, fake_models, capsys):
    """The same 12 images and CSV in a local folder and in a Qdrant store, built by the CLI."""
    from tbps.cli.main import main

    imgs = tmp_path / "imgs"
    paths = write_images(imgs, 12)
    csv = tmp_path / "meta.csv"
    csv.write_text("file,camera,time\n" + "".join(f"{p.name},c{i % 3},2024-01-{i + 1:02d}\n" for i, p in enumerate(paths)))
    out = {}
    for name in (str(tmp_path / "g.idx"), f"qdrant:{tmp_path / 'g.qdrant'}"):
        where = ["--store", name] if name.startswith("qdrant:") else [name]  # the flag and the positional
        rc = main(["index", "build", *where, "--checkpoint", str(fake_models[0]), "--images", str(imgs),
                   "--metadata", str(csv), "--workers", "0", "--no-progress", "--json"])
        res = capsys.readouterr()
        assert rc == 0, res.err
        assert json.loads(res.out)["count"] == 12
        out["local" if name.endswith(".idx") else "qdrant"] = name
    return out, imgs, paths


def _search(capsys, *argv):
    from tbps.cli.main import main

    rc = main(["search", *map(str, argv), "--json"])
    res = capsys.readouterr()
    return rc, (json.loads(res.out) if rc == 0 else None), res.err


def test_cli_build_search_add_remove_on_qdrant(two_stores, fake_models, capsys, tmp_path):
    from tbps.cli.main import main

    names, imgs, paths = two_stores
    for where in (None, "camera = 'c1'", "time >= '2024-01-05' AND NOT camera = 'c0'"):
        extra = ["--where", where] if where else []
        got = {"local": _search(capsys, names["local"], "a man in a red coat", "-k", "5", *extra)[1],
               "qdrant": _search(capsys, "--store", names["qdrant"], "a man in a red coat", "-k", "5", *extra)[1]}
        assert [r["path"] for r in got["qdrant"]["results"]] == [r["path"] for r in got["local"]["results"]]
        np.testing.assert_allclose([r["score"] for r in got["qdrant"]["results"]],
                                   [r["score"] for r in got["local"]["results"]], atol=1e-5)
        assert [r["metadata"] for r in got["qdrant"]["results"]] == [r["metadata"] for r in got["local"]["results"]]
    rc, _, err = _search(capsys, names["qdrant"], "red", "--where", "camera LIKE 'c%'")
    assert rc == 2 and err.startswith("tbps: error: the qdrant store cannot evaluate LIKE") and err.count("\n") == 1
    rc, _, err = _search(capsys, names["qdrant"], "red", "--checkpoint", fake_models[1])
    assert rc == 2 and "does not match" in err
    write_images(imgs, 3, seed=3, start=50)
    assert main(["index", "add", names["qdrant"], str(imgs), "--workers", "0", "--no-progress", "--json"]) == 0
    st = json.loads(capsys.readouterr().out)
    assert (st["added"], st["unchanged"], st["count"]) == (3, 12, 15)
    assert main(["index", "remove", "--store", names["qdrant"], paths[0].name, str(imgs / "img0050.jpg")]) == 0
    assert "index now holds 13" in capsys.readouterr().out
    assert main(["index", "info", names["qdrant"]]) == 0
    out = capsys.readouterr().out
    assert "13 x 32-d" in out and "qdrant collection 'gallery'" in out and "camera, time" in out
    rc = main(["index", "build", names["qdrant"], "--checkpoint", str(fake_models[0]), "--images", str(imgs)])
    assert rc == 2 and "already exists" in capsys.readouterr().err
    rc = main(["search", f"qdrant:{tmp_path / 'nothing'}", "red"])
    assert rc == 2 and "does not exist" in capsys.readouterr().err
    rc = main(["search", "--store", names["qdrant"], names["local"], "red"])
    assert rc == 2 and "not both" in capsys.readouterr().err


def test_rest_api_search_on_qdrant(two_stores):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from tbps.serve import create_app

    names, _, paths = two_stores
    enc = FakeEncoder(embed_dim=32, seed=0)
    answers = {}
    for backend, name in names.items():
        with open_store(name) as store, TestClient(create_app(store, enc)) as c:
            r = c.post("/search", json={"text": "a woman in a green dress", "k": 4, "filters": {"camera": "c2"}})
            assert r.status_code == 200, r.text
            answers[backend] = [(h["name"], round(h["score"], 5), h["metadata"]["camera"]) for h in r.json()["results"]]
            assert c.get("/stats").json()["items"] == 12
            first = r.json()["results"][0]
            assert c.get(first["image_url"]).content == (paths[0].parent / first["name"]).read_bytes()
            assert c.get("/images/999").status_code == 404
            bad = c.post("/search", json={"text": "x", "filters": "colour = 'red'"})
            assert bad.status_code == 422 and "unknown column" in bad.json()["detail"]
    assert answers["qdrant"] == answers["local"] and len(answers["local"]) == 4


def test_qdrant_local_folder_is_checked_before_it_is_opened(tmp_path):
    """A folder the local engine would unpickle is read with a points-only unpickler first, and a
    foreign folder is never written into."""
    import pickle
    import sqlite3

    name = f"qdrant:{tmp_path / 'q'}"
    feats, recs = _data()
    with create_store(name, dim=D, fingerprint=FP) as s:
        s.add(feats[:3], recs[:3])
    with open_store(name) as s:  # what tbps writes passes the check
        assert len(s) == 3
    db = sqlite3.connect(tmp_path / "q" / "collection" / "gallery" / "storage.sqlite")
    db.execute("UPDATE points SET point = ? WHERE rowid = 1", (pickle.dumps(os.system),))  # a planted callable
    db.commit()
    db.close()
    with pytest.raises(IndexFormatError, match="holds something other than points.*posix.system|system"):
        open_store(name)
    (tmp_path / "crops").mkdir()
    (tmp_path / "crops" / "a.jpg").write_bytes(b"x")
    with pytest.raises(IndexInputError, match="not a qdrant store"):
        create_store(f"qdrant:{tmp_path / 'crops'}", dim=D, fingerprint=FP)
    with pytest.raises(IndexFormatError, match="does not exist"):
        open_store(f"qdrant:{tmp_path / 'crops'}")
    assert sorted(os.listdir(tmp_path / "crops")) == ["a.jpg"]
