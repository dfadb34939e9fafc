"""Gallery index: build/add/remove/info round trips, search against a naive reference,
metadata CSV, encoder mismatch, exact vs faiss, corrupt files, reranking."""

from __future__ import annotations

import os
import pathlib
import time

import numpy as np
import pytest
from PIL import Image

from tbps.index import (
    EncoderMismatchError,
    GalleryIndex,
    IndexFormatError,
    IndexInputError,
    QueryError,
    add_to_index,
    build_index,
    remove_from_index,
)
from tbps.index import store as store_mod
from tbps.threads import torch_threads
from tests.fake_encoder import FakeEncoder


def write_images(folder: pathlib.Path, n: int, seed: int = 0, start: int = 0, ext: str = "jpg") -> list[pathlib.Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(start, start + n):
        p = folder / f"img{i:04d}.{ext}"
        # Smooth random colour blobs: distinct images whose features survive JPEG.
        base = rng.integers(0, 256, (4, 2, 3)).astype(np.uint8)
        Image.fromarray(base).resize((16, 32), Image.BILINEAR).save(p, quality=95)
        paths.append(p)
    return paths


def reference_features(enc: FakeEncoder, paths) -> np.ndarray:
    """Features computed directly, without the index pipeline: (N, D)."""
    import torch

    px = torch.stack([enc.preprocess(Image.open(p)) for p in paths])
    return enc.encode_images(px)


def naive_topk(feats: np.ndarray, q: np.ndarray, k: int) -> list[int]:
    s = feats @ q
    return sorted(range(len(s)), key=lambda i: (-s[i], i))[:k]


@pytest.fixture()
def enc():
    return FakeEncoder(embed_dim=32, seed=0)


def test_build_search_matches_naive_reference(tmp_path, enc):
    paths = write_images(tmp_path / "imgs", 30)
    stats = build_index(tmp_path / "idx", enc, tmp_path / "imgs", workers=0, progress=False)
    assert stats["count"] == 30 and stats["added"] == 30 and stats["skipped_count"] == 0
    ref = reference_features(enc, paths)
    with GalleryIndex.open(tmp_path / "idx") as ix:
        assert len(ix) == 30 and ix.search_mode == "exact"
        assert ix.fingerprint == enc.fingerprint
        queries = enc.encode_texts(["a man in a red coat", "blue jeans", "backpack"])
        results = ix.search(queries, k=7)
        for q, hits in zip(queries, results):
            expected = naive_topk(ref, q, 7)
            assert [pathlib.Path(h.path).name for h in hits] == [paths[i].name for i in expected]
            np.testing.assert_allclose([h.score for h in hits], ref[expected] @ q, atol=1e-5)
        # Single (D,) query, get(), image_path(), metadata.
        hit = ix.search(ref[3], k=1)[0][0]
        assert hit.path == str(paths[3].resolve()) and hit.score == pytest.approx(1.0, abs=1e-5)
        assert ix.get(hit.id).path == hit.path and ix.image_path(hit.id) == paths[3].resolve()
        assert hit.metadata["width"] == 16 and hit.metadata["height"] == 32
        assert hit.metadata["size"] == paths[3].stat().st_size and len(hit.metadata["sha256"]) == 64
        with pytest.raises(KeyError):
            ix.get(12345)
        info = ix.info()
        assert info["count"] == 30 and info["dim"] == 32 and info["sizes_bytes"]["features"] > 30 * 32 * 4


def test_k_larger_than_gallery_and_bad_queries(tmp_path, enc):
    write_images(tmp_path / "imgs", 5)
    build_index(tmp_path / "idx", enc, tmp_path / "imgs", workers=0, progress=False)
    ix = GalleryIndex.open(tmp_path / "idx")
    q = enc.encode_texts(["anything"])
    hits = ix.search(q, k=100)[0]
    assert len(hits) == 5 and len({h.id for h in hits}) == 5
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    for bad_k in (0, -3):
        with pytest.raises(QueryError, match="k must be a positive integer"):
            ix.search(q, k=bad_k)
    with pytest.raises(QueryError, match="D=32"):
        ix.search(np.ones(7, np.float32), k=3)


def test_add_detects_new_changed_and_touched_files(tmp_path, enc):
    imgs = tmp_path / "imgs"
    paths = write_images(imgs, 10)
    build_index(tmp_path / "idx", enc, imgs, workers=0, progress=False)
    before = GalleryIndex.open(tmp_path / "idx")
    id_of = {h.path: h.id for h in before.search(enc.encode_texts(["x"]), k=10)[0]}

    # Nothing changed: no new generation.
    st = add_to_index(tmp_path / "idx", enc, imgs, workers=0, progress=False)
    assert (st["added"], st["updated"], st["generation"]) == (0, 0, 1)

    new = write_images(imgs, 2, seed=9, start=100)
    changed = paths[4]
    write_images(tmp_path / "other", 1, seed=5)[0].replace(changed)  # new content, same name
    touched = paths[7]
    os.utime(touched, ns=(time.time_ns(), time.time_ns() + 10**9))  # mtime only
    st = add_to_index(tmp_path / "idx", enc, imgs, workers=0, progress=False)
    assert (st["added"], st["updated"], st["touched"], st["unchanged"]) == (2, 1, 1, 8)
    ix = GalleryIndex.open(tmp_path / "idx")
    assert len(ix) == 12 and ix.generation == 2
    ref = reference_features(enc, [changed, *new])
    # The changed file keeps its id and gets its new feature.
    cid = id_of[str(changed.resolve())]
    np.testing.assert_allclose(ix.feature(cid), ref[0], atol=1e-6)
    assert ix.get(cid).metadata["sha256"] != before.get(cid).metadata["sha256"]
    # Touched file: same feature, new mtime recorded (so it is not re-hashed next time).
    tid = id_of[str(touched.resolve())]
    np.testing.assert_array_equal(ix.feature(tid), before.feature(tid))
    assert ix.get(tid).metadata["mtime"] > before.get(tid).metadata["mtime"]
    # New files got fresh ids and are found by their own features.
    for p, f in zip(new, ref[1:]):
        hit = ix.search(f, k=1)[0][0]
        assert hit.path == str(p.resolve()) and hit.id >= 10
    # The old generation stays readable for readers that opened it.
    assert len(before) == 10 and before.search(enc.encode_texts(["x"]), k=3)[0]


def test_remove_files_and_folders(tmp_path, enc):
    imgs = tmp_path / "imgs"
    write_images(imgs, 4)
    write_images(imgs / "cam2", 3, seed=1, start=50)
    build_index(tmp_path / "idx", enc, imgs, recursive=True, workers=0, progress=False)
    before = GalleryIndex.open(tmp_path / "idx")
    assert len(before) == 7
    id_by_name = {pathlib.Path(before.get(i).path).name: int(i) for i in before.ids}
    st = remove_from_index(tmp_path / "idx", [str(imgs / "img0001.jpg"), "cam2", "nope.jpg"])
    assert st["removed"] == 4 and st["not_found"] == ["nope.jpg"]
    ix = GalleryIndex.open(tmp_path / "idx")
    left = sorted(pathlib.Path(ix.get(i).path).name for i in ix.ids)
    assert left == ["img0000.jpg", "img0002.jpg", "img0003.jpg"]
    kept = sorted(id_by_name[n] for n in left)
    assert list(ix.ids) == kept  # ids are stable, never renumbered
    for i in kept:
        np.testing.assert_array_equal(ix.feature(i), before.feature(i))
    # Removed ids are gone from search.
    hits = ix.search(enc.encode_texts(["q"]), k=10)[0]
    assert sorted(h.id for h in hits) == kept
    # add brings back the removed files as new items with new ids.
    st = add_to_index(tmp_path / "idx", enc, imgs, recursive=True, workers=0, progress=False)
    assert st["added"] == 4 and list(GalleryIndex.open(tmp_path / "idx").ids) == kept + [7, 8, 9, 10]


def test_metadata_csv_columns_and_filters(tmp_path, enc):
    imgs = tmp_path / "imgs"
    paths = write_images(imgs, 12)
    rows = ["Image,Camera,Person ID,time"]
    for i, p in enumerate(paths[:11]):  # the last image has no CSV row -> NULLs
        rows.append(f"{p.name},c{i % 3},{i % 4},2024-01-{i + 1:02d}")
    rows.append("ghost.jpg,c9,1,2024-02-01")  # names no image
    (tmp_path / "meta.csv").write_text("\n".join(rows) + "\n")
    st = build_index(tmp_path / "idx", enc, imgs, metadata_csv=tmp_path / "meta.csv", workers=0, progress=False)
    assert st["metadata_rows_matched"] == 11 and st["metadata_rows_unmatched"] == 1
    ix = GalleryIndex.open(tmp_path / "idx")
    assert ix.columns[-3:] == ["camera", "person_id", "time"]
    q = enc.encode_texts(["someone"])
    ref = reference_features(enc, paths)

    def check(where, pred):
        hits = ix.search(q, k=50, where=where)[0]
        expected = [i for i in naive_topk(ref, q[0], 12) if pred(i)]
        assert [pathlib.Path(h.path).name for h in hits] == [paths[i].name for i in expected], where

    check("camera = 'c1'", lambda i: i < 11 and i % 3 == 1)
    check("camera = 'c1' AND person_id >= 2", lambda i: i < 11 and i % 3 == 1 and i % 4 >= 2)
    check("time >= '2024-01-05' AND NOT camera IN ('c0', 'c2')", lambda i: 4 <= i < 11 and i % 3 == 1)
    check("person_id = '3' OR camera IS NULL", lambda i: i == 11 or i % 4 == 3)
    check("camera LIKE 'C%' AND person_id BETWEEN 1 AND 2", lambda i: i < 11 and i % 4 in (1, 2))
    assert ix.search(q, k=5, where="camera = 'zzz'") == [[]]
    h = ix.search(q, k=50, where="person_id = 2")[0][0]
    assert isinstance(h.metadata["person_id"], int) and h.metadata["camera"].startswith("c")


def test_encoder_mismatch_is_refused(tmp_path, enc):
    write_images(tmp_path / "imgs", 3)
    build_index(tmp_path / "idx", enc, tmp_path / "imgs", workers=0, progress=False)
    ix = GalleryIndex.open(tmp_path / "idx")
    ix.check_encoder(FakeEncoder(embed_dim=32, seed=0))  # same model: fine
    other = FakeEncoder(embed_dim=32, seed=1)
    with pytest.raises(EncoderMismatchError, match="checkpoint_sha256"):
        ix.check_encoder(other)
    with pytest.raises(EncoderMismatchError):
        add_to_index(tmp_path / "idx", other, tmp_path / "imgs", workers=0, progress=False)
    resized = FakeEncoder(embed_dim=32, seed=0)
    resized.fingerprint = {**resized.fingerprint, "image_size": [32, 16]}
    with pytest.raises(EncoderMismatchError, match="image_size"):
        ix.check_encoder(resized)


@pytest.mark.parametrize("mode", ["ivf", "ivfpq", "hnsw"])
def test_approximate_mode_agrees_with_exact(tmp_path, enc, mode, monkeypatch):
    pytest.importorskip("faiss")
    write_images(tmp_path / "imgs", 120, seed=3)
    st = build_index(tmp_path / "idx", enc, tmp_path / "imgs", workers=0, progress=False, search_mode=mode)
    assert st["search_mode"] == mode
    ix = GalleryIndex.open(tmp_path / "idx")
    assert ix.info()["sizes_bytes"]["ann"] > 0
    q = np.concatenate([enc.encode_texts(["a", "b c", "d e f"]), np.asarray(ix.features[:5])])
    approx = ix.search(q, k=10)
    exact = ix.search(q, k=10, exact=True)
    for a, e in zip(approx, exact):
        # On a gallery this small both structures visit everything: identical results.
        assert [h.id for h in a] == [h.id for h in e]
        np.testing.assert_allclose([h.score for h in a], [h.score for h in e], atol=1e-6)
    # Filters through the ANN structure (faiss IDSelector) when the subset is large.
    monkeypatch.setattr(store_mod, "EXACT_SUBSET_MAX", 0)
    fa = ix.search(q, k=10, where="id >= 60")
    fe = ix.search(q, k=10, where="id >= 60", exact=True)
    for a, e in zip(fa, fe):
        assert all(h.id >= 60 for h in a)
        assert [h.id for h in a] == [h.id for h in e]
    # Incremental add and remove keep the ANN structure in step with the features.
    write_images(tmp_path / "imgs", 5, seed=8, start=500)
    add_to_index(tmp_path / "idx", enc, tmp_path / "imgs", workers=0, progress=False)
    remove_from_index(tmp_path / "idx", [str(tmp_path / "imgs" / "img0000.jpg")])
    ix2 = GalleryIndex.open(tmp_path / "idx")
    assert ix2.search_mode == mode and len(ix2) == 124
    for a, e in zip(ix2.search(q, k=10), ix2.search(q, k=10, exact=True)):
        assert [h.id for h in a] == [h.id for h in e] and 0 not in [h.id for h in a]


def test_corrupt_and_non_image_files_are_skipped_with_count(tmp_path, enc):
    imgs = tmp_path / "imgs"
    write_images(imgs, 6)
    (imgs / "garbage.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    good = (imgs / "img0000.jpg").read_bytes()
    (imgs / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (imgs / "notes.txt").write_text("not an image")
    (imgs / ".hidden.jpg").write_bytes(b"ignored: hidden")
    st = build_index(tmp_path / "idx", enc, imgs, workers=1, progress=False, batch_size=4)
    assert st["count"] == 6 and st["skipped_count"] == 3
    reasons = {pathlib.Path(s["path"]).name: s["reason"] for s in st["skipped"]}
    assert set(reasons) == {"garbage.jpg", "truncated.jpg", "notes.txt"}
    assert "not an image" in reasons["notes.txt"] and "truncated" in reasons["truncated.jpg"].lower()
    # add retries the bad files, reports them again, and commits nothing new.
    st = add_to_index(tmp_path / "idx", enc, imgs, workers=0, progress=False)
    assert (st["added"], st["skipped_count"], st["unchanged"], st["generation"]) == (0, 3, 6, 1)


def test_reranker_reorders_candidates(tmp_path, enc):
    write_images(tmp_path / "imgs", 20)
    build_index(tmp_path / "idx", enc, tmp_path / "imgs", workers=0, progress=False)
    ix = GalleryIndex.open(tmp_path / "idx")
    q = enc.encode_texts(["person"])
    plain = ix.search(q, k=5)[0]
    seen = {}

    def reverse(qf, cand_ids, cand_scores, index):
        seen["shape"] = cand_ids.shape
        assert index is ix and qf.shape == (1, 32)
        np.testing.assert_allclose(cand_scores[0], np.sort(cand_scores[0])[::-1])
        return -cand_scores  # the worst first-stage candidates win

    hits = ix.search(q, k=5, reranker=reverse, rerank_depth=8)[0]
    assert seen["shape"] == (1, 8)
    first_stage = ix.search(q, k=8)[0]
    assert [h.id for h in hits] == [h.id for h in first_stage[::-1][:5]]
    assert [h.id for h in hits] != [h.id for h in plain]
    assert hits[0].score == pytest.approx(-first_stage[-1].score)


def test_open_errors_are_clear(tmp_path, enc):
    with pytest.raises(IndexFormatError, match="does not exist"):
        GalleryIndex.open(tmp_path / "missing")
    (tmp_path / "plain").mkdir()
    with pytest.raises(IndexFormatError, match="not a tbps index"):
        GalleryIndex.open(tmp_path / "plain")
    write_images(tmp_path / "imgs", 3)
    build_index(tmp_path / "idx", enc, tmp_path / "imgs", workers=0, progress=False)
    with pytest.raises(IndexInputError, match="already exists"):
        build_index(tmp_path / "idx", enc, tmp_path / "imgs", workers=0, progress=False)
    (tmp_path / "idx" / "manifest.json").write_text("{not json")
    with pytest.raises(IndexFormatError, match="corrupt index manifest"):
        GalleryIndex.open(tmp_path / "idx")
    with pytest.raises(IndexInputError, match="does not exist"):
        build_index(tmp_path / "idx2", enc, tmp_path / "nope", workers=0, progress=False)


def test_second_writer_is_refused_while_one_holds_the_lock(tmp_path, enc):
    import fcntl

    from tbps.index import IndexBusyError

    write_images(tmp_path / "imgs", 3)
    build_index(tmp_path / "idx", enc, tmp_path / "imgs", workers=0, progress=False)
    with open(tmp_path / "idx" / ".lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a running writer does
        with pytest.raises(IndexBusyError, match="another tbps process is writing"):
            add_to_index(tmp_path / "idx", enc, tmp_path / "imgs", workers=0, progress=False)
        assert len(GalleryIndex.open(tmp_path / "idx")) == 3  # readers are never blocked
    remove_from_index(tmp_path / "idx", [str(tmp_path / "imgs" / "img0000.jpg")])  # lock released
    assert len(GalleryIndex.open(tmp_path / "idx")) == 2


@pytest.mark.parametrize(
    "csv_text,match",
    [
        ("camera,time\nc1,2024\n", "no image path column"),
        ("path,width\nimg0000.jpg,3\n", "clashes with a built-in column"),
        ("path,camera\nimg0000.jpg,c1,extra\n", "line 2: 3 fields"),
        ("path,camera\nimg0000.jpg,c1\n./img0000.jpg,c2\n", "line 3: duplicate row"),
        ("", "is empty"),
    ],
)
def test_bad_metadata_csv_is_a_clear_error(tmp_path, enc, csv_text, match):
    write_images(tmp_path / "imgs", 2)
    (tmp_path / "m.csv").write_text(csv_text)
    with pytest.raises(IndexInputError, match=match):
        build_index(tmp_path / "idx", enc, tmp_path / "imgs", metadata_csv=tmp_path / "m.csv", workers=0, progress=False)
    assert not (tmp_path / "idx" / "manifest.json").exists()


def test_add_with_metadata_adds_columns_and_values(tmp_path, enc):
    paths = write_images(tmp_path / "imgs", 4)
    (tmp_path / "a.csv").write_text("path,camera\n" + "".join(f"{p.name},c{i}\n" for i, p in enumerate(paths)))
    build_index(tmp_path / "idx", enc, tmp_path / "imgs", metadata_csv=tmp_path / "a.csv", workers=0, progress=False)
    (tmp_path / "b.csv").write_text(f"path,camera,zone\n{paths[1].name},c9,north\n")
    st = add_to_index(tmp_path / "idx", enc, tmp_path / "imgs", metadata_csv=tmp_path / "b.csv", workers=0, progress=False)
    assert st["added"] == 0 and st["metadata_rows_matched"] == 1
    ix = GalleryIndex.open(tmp_path / "idx")
    assert ix.columns[-2:] == ["camera", "zone"]
    hits = ix.search(enc.encode_texts(["x"]), k=10, where="zone = 'north'")[0]
    assert [pathlib.Path(h.path).name for h in hits] == [paths[1].name]
    assert hits[0].metadata["camera"] == "c9"
    assert {h.metadata["camera"] for h in ix.search(enc.encode_texts(["x"]), k=10)[0]} == {"c0", "c9", "c2", "c3"}


def test_store_read_api_for_writers(tmp_path, enc):
    """``file_states`` and ``ids_under``: what the writers read instead of the store's sqlite."""
    imgs = tmp_path / "imgs"
    top = write_images(imgs, 3)
    sub = write_images(imgs / "cam2", 2, seed=1, start=50)
    write_images(tmp_path / "imgs" / "cam22", 1, seed=2, start=90)  # a sibling whose name extends cam2
    build_index(tmp_path / "idx", enc, imgs, recursive=True, workers=0, progress=False)
    with GalleryIndex.open(tmp_path / "idx") as ix:
        states = ix.file_states()
        assert len(states) == 6 and set(states) == {ix.get(int(i)).path for i in ix.ids}
        for p in top + sub:
            i, size, mtime_ns, sha = states[str(p.resolve())]
            meta = ix.get(i).metadata
            assert (size, mtime_ns, sha) == (p.stat().st_size, p.stat().st_mtime_ns, meta["sha256"])
        by_name = {pathlib.Path(p).name: i for p, (i, *_) in states.items()}
        cam2 = str((imgs / "cam2").resolve())
        assert sorted(ix.ids_under(cam2)) == sorted(by_name[p.name] for p in sub)
        assert ix.ids_under(str(top[1].resolve())) == [by_name[top[1].name]]
        assert ix.ids_under(cam2 + "/img0050") == [] and ix.ids_under(str(tmp_path / "elsewhere")) == []


def test_embed_files_yields_batches_in_order_with_failures(tmp_path, enc):
    import hashlib

    from tbps.index.embed import embed_files

    paths = write_images(tmp_path / "imgs", 5)
    bad = tmp_path / "imgs" / "bad.jpg"
    bad.write_bytes(b"not an image at all")
    files = [str(p) for p in paths[:2]] + [str(bad)] + [str(p) for p in paths[2:]]
    batches = list(embed_files(files, enc, batch_size=4, workers=0, progress=False))
    assert [b.indices for b in batches] == [[0, 1, 3], [4, 5]]
    assert [b.failures for b in batches][1] == [] and batches[0].failures[0][0] == 2
    assert "not an image" in batches[0].failures[0][1]
    feats = np.concatenate([b.features for b in batches])
    np.testing.assert_allclose(feats, reference_features(enc, paths), atol=1e-6)
    infos = [info for b in batches for info in b.infos]
    assert [i["sha256"] for i in infos] == [hashlib.sha256(p.read_bytes()).hexdigest() for p in paths]
    assert {(i["width"], i["height"]) for i in infos} == {(16, 32)}
    assert list(embed_files([], enc, workers=0, progress=False)) == []


class _ThreadsSeen(FakeEncoder):
    """FakeEncoder that records torch's thread count at each forward pass."""

    def __init__(self):
        super().__init__(embed_dim=32, seed=0)
        self.threads: list[int] = []

    def encode_images(self, pixels):
        import torch

        self.threads.append(torch.get_num_threads())
        return super().encode_images(pixels)


def test_decoding_threads_and_workers_give_the_reference_batches(tmp_path, enc):
    """The CPU default (a pool of threads per batch) and worker processes (one stacked tensor
    per batch) yield the same batches as features computed one image at a time."""
    from tbps.index.embed import embed_files

    paths = write_images(tmp_path / "imgs", 11)
    bad = tmp_path / "imgs" / "zz.jpg"
    bad.write_bytes(b"\xff\xd8 truncated")
    files = [str(p) for p in paths[:6]] + [str(bad)] + [str(p) for p in paths[6:]]
    runs = {}
    for threads, w in ((1, 0), (2, 0), (2, 1)):  # decoding ahead on a spare core, between passes, workers
        with torch_threads(threads):
            runs[threads, w] = list(embed_files(files, enc, batch_size=4, workers=w, progress=False))
    ref = reference_features(enc, paths)
    for w, batches in runs.items():
        assert [b.indices for b in batches] == [[0, 1, 2, 3], [4, 5, 7], [8, 9, 10, 11]], w
        assert [b.failures[0][0] for b in batches if b.failures] == [6], w
        np.testing.assert_allclose(np.concatenate([b.features for b in batches]), ref, atol=1e-6)
    assert [b.infos for b in runs[1, 0]] == [b.infos for b in runs[2, 0]] == [b.infos for b in runs[2, 1]]


class _Logged(FakeEncoder):
    """FakeEncoder whose preprocess and (slow) forward pass log when they run.

    The first forward pass lasts until ``expect`` decodes have been logged since it began (at most
    30 s: on a busy machine the decoding thread may wait its turn for longer than any fixed pass),
    or 0.3 s when none is expected, a window in which a wrongly scheduled decode would show."""

    def __init__(self, log, expect: int = 0):
        super().__init__(embed_dim=8, seed=0)
        self.log, self.expect = log, expect

    def preprocess(self, image):
        self.log.append("decode")
        return super().preprocess(image)

    def encode_images(self, pixels):
        want = self.expect if "forward" not in self.log else 0
        self.log.append("forward")
        start = len(self.log)
        deadline = time.monotonic() + (30.0 if want else 0.3)
        while time.monotonic() < deadline and (not want or self.log[start:].count("decode") < want):
            time.sleep(0.01)
        self.log.append("forward done")
        return super().encode_images(pixels)


@pytest.mark.parametrize("threads", [1, 2])
def test_spare_cores_decode_the_next_batch_during_the_forward_pass(tmp_path, threads):
    """One model thread on 2+ cores: the next batch is decoded while this one is embedded.
    As many threads as cores: decoding only between forward passes, never beside them."""
    from tbps.index.embed import _cores, embed_files

    if threads == 1 and _cores() < 2:
        pytest.skip("needs a spare core")
    paths = [str(p) for p in write_images(tmp_path / "imgs", 4)]
    log: list[str] = []
    with torch_threads(threads if threads == 1 else _cores()):
        list(embed_files(paths, _Logged(log, expect=2 if threads == 1 else 0), batch_size=2, workers=0,
                         progress=False))
    first = log.index("forward")
    during = log[first + 1:log.index("forward done")]
    assert during == (["decode", "decode"] if threads == 1 else [])
    assert log.count("decode") == 4 and log.count("forward") == 2


def test_default_workers_on_cpu_and_gpu():
    from tbps.index.embed import _cores, default_workers

    assert default_workers("cpu") == 0  # the model owns the cores: decode between forward passes
    assert default_workers("cuda:0") == max(1, min(4, _cores() - 1))


def test_workers_leave_the_model_the_other_cores_then_restore(tmp_path):
    """With decoding workers on CPU, the forward passes run on the cores they leave, and the
    caller's thread count comes back, also when the caller stops early."""
    import torch

    from tbps.index.embed import _cores, embed_files

    paths = [str(p) for p in write_images(tmp_path / "imgs", 6)]
    spy = _ThreadsSeen()
    with torch_threads(max(2, torch.get_num_threads())):
        n = torch.get_num_threads()
        list(embed_files(paths, spy, batch_size=2, workers=1, progress=False))
        assert spy.threads == [max(1, min(n, _cores() - 1))] * 3 and torch.get_num_threads() == n
        spy.threads.clear()
        for _ in embed_files(paths, spy, batch_size=2, workers=0, progress=False):
            break  # abandoned after one batch: closing the generator restores the count
        assert spy.threads == [n] and torch.get_num_threads() == n


def test_every_write_publishes_with_one_manifest_write(tmp_path, enc, monkeypatch):
    """build, add, remove and build_from_features each write manifest.json once, as the
    last step; a write with nothing to commit writes none."""
    from tbps.index import build_index_from_features, generation

    writes = []
    real = generation.write_json

    def counting(path, obj):
        writes.append((pathlib.Path(path).name, obj["generation"]))
        real(path, obj)

    monkeypatch.setattr(generation, "write_json", counting)
    imgs = tmp_path / "imgs"
    paths = write_images(imgs, 4)
    build_index(tmp_path / "idx", enc, imgs, workers=0, progress=False)
    add_to_index(tmp_path / "idx", enc, imgs, workers=0, progress=False)  # nothing new: no write
    write_images(imgs, 1, seed=3, start=10)
    add_to_index(tmp_path / "idx", enc, imgs, workers=0, progress=False)
    remove_from_index(tmp_path / "idx", [str(paths[0])])
    remove_from_index(tmp_path / "idx", [str(paths[0])])  # already gone: no write
    build_index_from_features(tmp_path / "ff", np.eye(3, 8, dtype=np.float32), ["a", "b", "c"],
                              fingerprint=enc.fingerprint)
    assert writes == [("manifest.json", 1), ("manifest.json", 2), ("manifest.json", 3), ("manifest.json", 1)]


def test_write_generation_publishes_after_every_file_is_on_disk(tmp_path, enc):
    """At the "before-manifest" step the new generation is complete and unpublished."""
    from tbps.index.generation import FeatureEdit, GenerationWriter, copy_db, write_generation

    write_images(tmp_path / "imgs", 3)
    build_index(tmp_path / "idx", enc, tmp_path / "imgs", workers=0, progress=False)
    root = (tmp_path / "idx").resolve()
    seen = []

    def step(name):
        with GalleryIndex.open(root) as now:
            seen.append((name, now.generation, sorted(os.listdir(root))))

    with GenerationWriter(root, create=False) as writer, GalleryIndex.open(root) as old:
        copy_db(writer).close()  # the items table, unchanged
        manifest = write_generation(writer, {}, search_mode="auto", on_step=step,
                                    edit=FeatureEdit(old.features, old.ids))
    assert [(name, gen) for name, gen, _ in seen] == [("before-manifest", 1)]
    assert {"features-2.npy", "ids-2.npy", "meta-2.sqlite"} <= set(seen[0][2])
    assert manifest["generation"] == 2 and manifest["created"] == old.manifest["created"]
    with GalleryIndex.open(root) as ix:
        assert ix.generation == 2 and list(ix.ids) == list(old.ids)
        np.testing.assert_array_equal(np.asarray(ix.features), np.asarray(old.features))
