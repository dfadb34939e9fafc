"""Partitioned builds (``tbps.index.partition``): equal to the one-pass build, split across two
gloo processes with byte-equal results, resumable after SIGKILL, and never reusing a partition
of another file list or encoder."""

from __future__ import annotations

import contextlib
import io
import json
import os
import pathlib
import sqlite3
import subprocess
import sys

import numpy as np
import pytest
import torch.multiprocessing as mp

from tbps.index import build_index
from tbps.index.errors import IndexInputError
from tbps.index.partition import build_index_partitioned, read_file_list, scan_for_partitions
from tbps.index.store import read_manifest
from tests.fake_encoder import FakeEncoder
from tests.torchrun import free_port, torchrun_env

sys.path.insert(0, os.path.dirname(__file__))
from test_index import write_images  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
N_IMAGES, PART = 27, 5  # 6 partitions, the last one short; one of the files is not an image


@pytest.fixture()
def gallery(tmp_path) -> pathlib.Path:
    imgs = tmp_path / "imgs"
    write_images(imgs, N_IMAGES - 1, seed=4)
    (imgs / "img0013b.jpg").write_bytes(b"not a jpeg")  # sorts into partition 2: skipped, reported
    return imgs


def snapshot(index) -> tuple[bytes, list[tuple], dict]:
    """What a build produced: the features' bytes, every sqlite row in id order, and the manifest's counts."""
    root = pathlib.Path(index)
    m = read_manifest(root)
    feats = np.load(root / m["files"]["features"])
    ids = np.load(root / m["files"]["ids"])
    with contextlib.closing(sqlite3.connect(root / m["files"]["meta"])) as db:
        rows = db.execute("SELECT * FROM items ORDER BY id").fetchall()
    assert ids.tolist() == list(range(len(ids))) == [r[0] for r in rows]  # ids 0..N-1, in file order
    return feats.tobytes(), rows, {"count": m["count"], "next_id": m["next_id"], "dim": m["dim"]}


def build_parts(index, imgs, enc=None, **kw) -> dict:
    files = scan_for_partitions(imgs, False, index)
    return build_index_partitioned(index, enc or FakeEncoder(embed_dim=32), files, imgs, partition_size=PART,
                                   batch_size=3, workers=0, progress=False, **kw)


def test_partitioned_build_equals_the_one_pass_build(tmp_path, gallery):
    st = build_parts(tmp_path / "p.idx", gallery)
    assert (st["partitions"], st["embedded_partitions"], st["reused_partitions"]) == (6, 6, 0)
    assert st["count"] == N_IMAGES - 1 and st["skipped_count"] == 1 and "img0013b" in st["skipped"][0]["path"]
    assert not (tmp_path / "p.idx.parts").exists()  # the work folder goes once the index is published
    build_index(tmp_path / "o.idx", FakeEncoder(embed_dim=32), gallery, workers=0, progress=False, batch_size=3)
    pf, prows, pm = snapshot(tmp_path / "p.idx")
    of, orows, om = snapshot(tmp_path / "o.idx")
    assert prows == orows and pm == om  # same ids, paths, sizes, mtimes, hashes, widths, heights
    np.testing.assert_allclose(np.frombuffer(pf, np.float32), np.frombuffer(of, np.float32), atol=1e-6)
    with pytest.raises(IndexInputError, match="already exists"):
        build_parts(tmp_path / "p.idx", gallery)


def _cli_worker(rank: int, world: int, port: int, argv: list[str], out: str) -> None:
    """One torchrun-like process: the environment torchrun sets, then `tbps index build` in-process."""
    torchrun_env(rank, world, port)
    import tbps.cli.common as common

    common.load_encoder = _fake_load_encoder  # a spawned process of its own: nothing to restore
    _cli_build(argv, out, rank)


def _fake_load_encoder(checkpoint, device="cpu", image_tta="none"):
    return FakeEncoder(embed_dim=32)


def _cli_build(argv: list[str], out: str, rank: int = 0) -> None:
    from tbps.cli.main import main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main(argv)
    pathlib.Path(out, f"rank{rank}.json").write_text(json.dumps({"code": code, "stdout": buf.getvalue()}))


def test_two_gloo_processes_build_exactly_what_one_process_builds(tmp_path, gallery):
    def argv(index):
        return ["index", "build", str(index), "--checkpoint", "fake.pt", "--images", str(gallery),
                "--partition-size", str(PART), "--batch-size", "3", "--workers", "0", "--no-progress", "--json"]

    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    import tbps.cli.common as common

    with pytest.MonkeyPatch.context() as m:  # one plain process, in this one: restore the loader after
        m.setattr(common, "load_encoder", _fake_load_encoder)
        _cli_build(argv(tmp_path / "one.idx"), str(tmp_path / "one"))
    mp.spawn(_cli_worker, args=(2, free_port(), argv(tmp_path / "two.idx"), str(tmp_path / "two")), nprocs=2,
             join=True)
    r0 = json.loads((tmp_path / "two" / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "two" / "rank1.json").read_text())
    assert r0["code"] == 0 and r1["code"] == 0 and r1["stdout"] == ""  # rank 0 alone reports
    stats = json.loads(r0["stdout"])
    assert stats["partitions"] == 6 and stats["embedded_partitions"] == 3  # rank 1 embedded the other 3
    one = json.loads(json.loads((tmp_path / "one" / "rank0.json").read_text())["stdout"])
    assert one["embedded_partitions"] == 6
    assert snapshot(tmp_path / "two.idx") == snapshot(tmp_path / "one.idx")  # byte-equal features, same rows


KILL_SCRIPT = """
import sys
from tbps.index.partition import build_index_partitioned, scan_for_partitions
from tests.fake_encoder import FakeEncoder
idx, imgs = sys.argv[1], sys.argv[2]
build_index_partitioned(idx, FakeEncoder(embed_dim=32, seed=int(sys.argv[3])), scan_for_partitions(imgs, False, idx),
                        imgs, partition_size=5, batch_size=3, workers=0, progress=False)
"""


def run_killed(index, imgs, after: int, seed: int = 0) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "src")]),
               TBPS_PARTITION_TEST_KILL_AFTER=str(after))
    return subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(index), str(imgs), str(seed)], env=env,
                          capture_output=True, text=True, timeout=120)


def test_a_killed_build_resumes_and_equals_an_uninterrupted_one(tmp_path, gallery):
    res = run_killed(tmp_path / "k.idx", gallery, after=2)
    assert res.returncode == -9, res.stderr  # SIGKILL after the second partition was written
    parts = sorted(p.name for p in (tmp_path / "k.idx.parts").iterdir())
    assert parts == ["part-000000.npz", "part-000001.npz"]  # complete partitions only, no temp files
    assert not (tmp_path / "k.idx" / "manifest.json").exists()
    st = build_parts(tmp_path / "k.idx", gallery)
    assert (st["embedded_partitions"], st["reused_partitions"]) == (4, 2)
    build_parts(tmp_path / "u.idx", gallery)
    feats, rows, meta = snapshot(tmp_path / "k.idx")
    assert (feats, rows, meta) == snapshot(tmp_path / "u.idx")
    paths = [r[1] for r in rows]  # nothing lost, nothing duplicated
    assert len(set(paths)) == len(paths) == N_IMAGES - 1
    assert set(paths) == {str(p.resolve()) for p in gallery.iterdir() if p.name != "img0013b.jpg"}


def test_stale_or_damaged_partitions_are_embedded_again(tmp_path, gallery):
    # Partitions written by another encoder (seed 1) are not reused by this one (seed 0).
    assert run_killed(tmp_path / "s.idx", gallery, after=3, seed=1).returncode == -9
    work = tmp_path / "s.idx.parts"
    assert len(list(work.iterdir())) == 3
    st = build_parts(tmp_path / "s.idx", gallery, keep_parts=True)
    assert (st["embedded_partitions"], st["reused_partitions"]) == (6, 0)
    reference = snapshot(tmp_path / "s.idx")
    # A changed file (new mtime) invalidates its partition only; a torn partition file is redone.
    os.utime(gallery / "img0007.jpg", ns=(1, 1))
    (work / "part-000004.npz").write_bytes((work / "part-000004.npz").read_bytes()[:100])
    st = build_parts(tmp_path / "s.idx", gallery, overwrite=True)
    assert (st["embedded_partitions"], st["reused_partitions"]) == (2, 4)
    feats, rows, _ = snapshot(tmp_path / "s.idx")
    assert feats == reference[0] and [r[:4] for r in rows] == [r[:4] for r in reference[1]] and rows != reference[1]


def test_file_list_input(tmp_path, gallery):
    lst = tmp_path / "paths.txt"
    names = sorted(p.name for p in gallery.iterdir())
    lst.write_text("# gallery\n" + "\n".join(f"imgs/{n}" for n in reversed(names)) + f"\n\nimgs/{names[0]}\n")
    files, root = read_file_list(lst)
    assert root == tmp_path.resolve() and [f.relpath for f in files] == [f"imgs/{n}" for n in names]
    st = build_index_partitioned(tmp_path / "l.idx", FakeEncoder(embed_dim=32), files, root, partition_size=PART,
                                 batch_size=3, workers=0, progress=False)
    assert st["count"] == N_IMAGES - 1
    build_parts(tmp_path / "d.idx", gallery)
    assert snapshot(tmp_path / "l.idx")[0] == snapshot(tmp_path / "d.idx")[0]
    lst.write_text("imgs/img0000.jpg\nimgs/nope.jpg\n")
    with pytest.raises(IndexInputError, match="line 2: 'imgs/nope.jpg' does not exist"):
        read_file_list(lst)
