"""Crash safety: a writer killed with SIGKILL at any moment leaves the index as it was
before the command, or complete; the next write cleans up its leftovers."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tbps.index import GalleryIndex, add_to_index, build_index
from tests.fake_encoder import FakeEncoder

sys.path.insert(0, os.path.dirname(__file__))
from test_index import write_images  # noqa: E402

ADD_SCRIPT = """
import sys
from tbps.index import add_to_index
from tests.fake_encoder import FakeEncoder
print("started", file=sys.stderr, flush=True)
add_to_index(sys.argv[1], FakeEncoder(embed_dim=32, seed=0, delay_s=float(sys.argv[3])), sys.argv[2],
             batch_size=8, workers=0, progress=False)
"""


def state(path) -> str:
    """A digest of everything a reader sees: ids, paths, content hashes and features."""
    with GalleryIndex.open(path) as ix:
        h = hashlib.sha256()
        for i in ix.ids:
            hit = ix.get(int(i))
            h.update(f"{int(i)}|{hit.path}|{hit.metadata['sha256']}|".encode())
            h.update(np.asarray(ix.feature(int(i))).tobytes())
        return f"{len(ix)}:{h.hexdigest()}"


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # so the scripts import tests.fake_encoder


def script_env(**extra) -> dict:
    return dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]), **extra)


def start_add(index, images, delay_s=0.0, hook=None) -> subprocess.Popen:
    env = script_env()
    env.pop("TBPS_INDEX_TEST_HOOK", None)
    if hook:
        env["TBPS_INDEX_TEST_HOOK"] = hook
    return subprocess.Popen(
        [sys.executable, "-c", ADD_SCRIPT, str(index), str(images), str(delay_s)],
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, env=env, text=True,
    )


@pytest.fixture()
def gallery(tmp_path):
    """An index of 20 images, plus 40 new images and one changed image waiting to be added.

    Returns (index, images, before_state, after_state)."""
    enc = FakeEncoder(embed_dim=32, seed=0)
    imgs = tmp_path / "imgs"
    paths = write_images(imgs, 20)
    build_index(tmp_path / "idx", enc, imgs, workers=0, progress=False)
    before = state(tmp_path / "idx")
    write_images(imgs, 40, seed=7, start=100)
    write_images(tmp_path / "other", 1, seed=5)[0].replace(paths[3])
    # The state a complete add reaches, computed on a copy.
    shutil.copytree(tmp_path / "idx", tmp_path / "ref")
    add_to_index(tmp_path / "ref", enc, imgs, workers=0, progress=False)
    after = state(tmp_path / "ref")
    assert after != before
    return tmp_path / "idx", imgs, before, after


@pytest.mark.parametrize("hook", ["embedding", "before-manifest"])
def test_kill_at_hook_leaves_previous_state(gallery, hook):
    index, imgs, before, after = gallery
    proc = start_add(index, imgs, hook=hook)
    try:
        deadline = time.monotonic() + 120
        line = ""
        while f"tbps-index-hook {hook}" not in line:
            line = proc.stderr.readline()
            assert line or proc.poll() is None, f"writer exited before reaching {hook!r}"
            assert time.monotonic() < deadline
        if hook == "before-manifest":  # all of the new generation is on disk, unpublished
            assert (index / "features-2.npy").exists() and (index / "meta-2.sqlite").exists()
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert state(index) == before
    # The next write cleans up the dead writer's files and completes.
    add_to_index(index, FakeEncoder(embed_dim=32, seed=0), imgs, workers=0, progress=False)
    assert state(index) == after
    leftovers = [n for n in os.listdir(index) if n.endswith(".tmp") or n.startswith(("features-3", "meta-3"))]
    assert leftovers == []


def test_kill_at_random_moments(gallery):
    """SIGKILL after random delays: every time, the index is the before or the after state."""
    index, imgs, before, after = gallery
    rng = np.random.default_rng(0)
    seen = set()
    for delay in [0.05, *rng.uniform(0.0, 0.4, 4)]:
        proc = start_add(index, imgs, delay_s=0.02)
        assert "started" in proc.stderr.readline()  # imports done: the write begins now
        time.sleep(delay)
        proc.kill()
        proc.wait(30)
        s = state(index)
        assert s in (before, after), f"index is neither before nor after state after kill at {delay:.2f}s"
        seen.add("after" if s == after else "before")
        if s == after:
            break
    assert "before" in seen  # at least one kill landed mid-write


BUILD_SCRIPT = """
import sys
from tbps.index import build_index
from tests.fake_encoder import FakeEncoder
build_index(sys.argv[1], FakeEncoder(embed_dim=32, seed=0), sys.argv[2], workers=0, progress=False, overwrite=True)
"""


@pytest.mark.parametrize("existing", [False, True])
def test_killed_build_leaves_no_index_or_the_old_one(tmp_path, existing):
    from tbps.index import IndexFormatError

    imgs = tmp_path / "imgs"
    write_images(imgs, 12)
    enc = FakeEncoder(embed_dim=32, seed=0)
    if existing:  # --overwrite of an index built from fewer images
        write_images(tmp_path / "few", 3)
        build_index(tmp_path / "idx", enc, tmp_path / "few", workers=0, progress=False)
        before = state(tmp_path / "idx")
    env = script_env(TBPS_INDEX_TEST_HOOK="before-manifest")
    proc = subprocess.Popen([sys.executable, "-c", BUILD_SCRIPT, str(tmp_path / "idx"), str(imgs)],
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, env=env, text=True)
    try:
        line = ""
        while "tbps-index-hook before-manifest" not in line:
            line = proc.stderr.readline()
            assert line, "writer exited before reaching the hook"
        proc.kill()
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    if existing:
        assert state(tmp_path / "idx") == before
    else:
        with pytest.raises(IndexFormatError, match="not a tbps index"):
            GalleryIndex.open(tmp_path / "idx")
    # A new build over the debris succeeds and is complete.
    build_index(tmp_path / "idx", enc, imgs, workers=0, progress=False, overwrite=True)
    assert len(GalleryIndex.open(tmp_path / "idx")) == 12
