"""Bad inputs to `tbps index build|add|remove|info`, `tbps search` and `tbps serve`, in-process.

Each case of ``CASES`` runs ``tbps.cli.main.main(argv)`` and must end with its exit status and
ONE line naming the problem: no traceback, no half-made index folder, and the existing index
byte-identical afterwards. The encoder is ``FakeEncoder`` keyed by the checkpoint file's bytes
(its fingerprint carries their SHA-256, as the real one does), so no model loads.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import shutil
import subprocess
import sys

import pytest
import torch
from PIL import Image

import tbps.cli.common as cli_common
from tbps.cli.main import main
from tests.fake_encoder import FakeEncoder
from tests.test_images import png_header


def fake_load_encoder(checkpoint, device="cpu", image_tta="none"):
    """The fake encoder of a checkpoint file: its seed and fingerprint follow the file's bytes."""
    if device != "cpu":
        raise cli_common.UserError(f"device {device!r} is not available")
    data = pathlib.Path(checkpoint).read_bytes()
    enc = FakeEncoder(embed_dim=16, seed=data[0] % 7)
    enc.fingerprint = {**enc.fingerprint, "checkpoint_sha256": hashlib.sha256(data).hexdigest()}
    enc.checkpoint = str(pathlib.Path(checkpoint).resolve())
    return enc


def _images(folder: pathlib.Path, n: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", (8, 16), (20 * i, 200 - 10 * i, 90)).save(folder / f"p{i}.png")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """An index of 6 images, its checkpoint, and the bad inputs the cases name."""
    mp = pytest.MonkeyPatch()
    mp.setattr(cli_common, "load_encoder", fake_load_encoder)
    t = tmp_path_factory.mktemp("bad-inputs")
    _images(t / "imgs", 6)
    (t / "ckpt.pt").write_bytes(b"\x01checkpoint-a")
    (t / "other.pt").write_bytes(b"\x02checkpoint-b")
    (t / "meta.csv").write_text("file,camera,time\n" + "".join(f"p{i}.png,c{i % 2},{i}\n" for i in range(6)))
    assert main(["index", "build", str(t / "idx"), "--checkpoint", str(t / "ckpt.pt"), "--images", str(t / "imgs"),
                 "--metadata", str(t / "meta.csv"), "--workers", "0", "--no-progress"]) == 0
    (t / "empty").mkdir()
    (t / "junk").mkdir()
    (t / "junk" / "a.jpg").write_bytes(b"not a jpeg")
    (t / "junk" / "b.txt").write_text("hello")
    (t / "afile").write_text("x")
    (t / "empty.txt").write_text("# a file list with no path in it\n\n")
    (t / "junk.jpg").write_bytes(b"<html>")
    (t / "bomb.png").write_bytes(png_header(12000, 8000))
    (t / "q.png").write_bytes((t / "imgs" / "p1.png").read_bytes())
    (t / "bad.csv").write_text("file,camera\np0.png,c1,extra\n")
    (t / "dup.csv").write_text("file,camera\np0.png,c1\np0.png,c2\n")
    (t / "noname.csv").write_text("camera,time\nc1,3\n")
    (t / "corrupt").mkdir()
    (t / "corrupt" / "manifest.json").write_text("{not json")
    # an index whose checkpoint file was then overwritten (a new training run into the same folder)
    (t / "moved.pt").write_bytes(b"\x01checkpoint-a")
    assert main(["index", "build", str(t / "idx2"), "--checkpoint", str(t / "moved.pt"), "--images", str(t / "imgs"),
                 "--workers", "0", "--no-progress"]) == 0
    (t / "moved.pt").write_bytes(b"\x01checkpoint-a, retrained")
    yield t
    mp.undo()


def _deny(path_of):
    """A patch that makes listing the folder ``path_of(t)`` fail as for a user without permission."""
    def patch(mp, t):
        target = str(path_of(t))
        real_listdir, real_scandir = os.listdir, os.scandir

        def listdir(p="."):
            if str(p) == target:
                raise PermissionError(13, "Permission denied", target)
            return real_listdir(p)

        def scandir(p="."):
            if str(p) == target:
                raise PermissionError(13, "Permission denied", target)
            return real_scandir(p)

        mp.setattr(os, "listdir", listdir)
        mp.setattr(os, "scandir", scandir)
    return patch


def _no_mkdir(mp, t):
    real = pathlib.Path.mkdir

    def mkdir(self, *a, **kw):
        if self.name == "new":
            raise PermissionError(13, "Permission denied", str(self))
        return real(self, *a, **kw)

    mp.setattr(pathlib.Path, "mkdir", mkdir)


BUILD = ["index", "build", "{new}", "--checkpoint", "{t}/ckpt.pt", "--workers", "0", "--no-progress"]
# (id, argv, exit status, fragment of the one error line, patch or None)
CASES = [
    ("build-missing-images", BUILD + ["--images", "{t}/nope"], 2, "does not exist", None),
    ("build-images-is-a-file", BUILD + ["--images", "{t}/afile"], 2, "is not a directory", None),
    ("build-empty-gallery", BUILD + ["--images", "{t}/empty"], 2, "no files in", None),
    ("build-empty-partitioned", BUILD + ["--images", "{t}/empty", "--partition-size", "2"], 2, "no files in", None),
    ("build-empty-list", BUILD + ["--list", "{t}/empty.txt"], 2, "empty.txt'; an index needs at least one", None),
    ("build-empty-qdrant", ["index", "build", "qdrant:{t}/newq", "--checkpoint", "{t}/ckpt.pt", "--images",
                            "{t}/empty", "--no-progress"], 2, "no files in", None),
    ("build-no-readable-image", BUILD + ["--images", "{t}/junk"], 2, "none of the 2 file(s)", None),
    ("build-workers-negative", BUILD + ["--images", "{t}/imgs", "--workers", "-1"], 2, "--workers must be >= 0", None),
    ("build-batch-size-zero", BUILD + ["--images", "{t}/imgs", "--batch-size", "0"], 2, "--batch-size", None),
    ("build-over-an-index", ["index", "build", "{t}/idx", "--checkpoint", "{t}/ckpt.pt", "--images", "{t}/imgs"],
     2, "already exists", None),
    ("build-over-a-folder", ["index", "build", "{t}/junk", "--checkpoint", "{t}/ckpt.pt", "--images", "{t}/imgs"],
     2, "not an index", None),
    ("build-under-a-file", ["index", "build", "{t}/afile/new", "--checkpoint", "{t}/ckpt.pt", "--images",
                            "{t}/imgs", "--workers", "0"], 2, "cannot write index folder", None),
    ("build-unwritable", BUILD + ["--images", "{t}/imgs"], 2, "cannot write index folder", _no_mkdir),
    ("build-unreadable-images", BUILD + ["--images", "{t}/imgs"], 2, "cannot read image directory",
     _deny(lambda t: t / "imgs")),
    ("build-missing-csv", BUILD + ["--images", "{t}/imgs", "--metadata", "{t}/nope.csv"], 2, "does not exist", None),
    ("build-ragged-csv", BUILD + ["--images", "{t}/imgs", "--metadata", "{t}/bad.csv"], 2, "3 fields", None),
    ("build-duplicate-csv-rows", BUILD + ["--images", "{t}/imgs", "--metadata", "{t}/dup.csv"], 2, "duplicate", None),
    ("build-csv-without-path", BUILD + ["--images", "{t}/imgs", "--metadata", "{t}/noname.csv"], 2,
     "no image path column", None),
    ("build-bad-search-mode", BUILD + ["--images", "{t}/imgs", "--search-mode", "fast"], 2, "invalid choice", None),
    ("add-missing-folder", ["index", "add", "{t}/idx", "{t}/nope", "--workers", "0"], 2, "does not exist", None),
    ("add-to-no-index", ["index", "add", "{new}", "{t}/imgs", "--checkpoint", "{t}/ckpt.pt"], 2, "does not exist",
     None),
    ("add-workers-negative", ["index", "add", "{t}/idx", "{t}/imgs", "--workers", "-1"], 2, "--workers", None),
    ("add-batch-size-zero", ["index", "add", "{t}/idx", "{t}/imgs", "--batch-size", "0"], 2, "--batch-size", None),
    ("add-ragged-csv", ["index", "add", "{t}/idx", "{t}/imgs", "--metadata", "{t}/bad.csv", "--workers", "0"], 2,
     "3 fields", None),
    ("add-other-model", ["index", "add", "{t}/idx", "{t}/imgs", "--checkpoint", "{t}/other.pt", "--workers", "0"],
     2, "does not match", None),
    ("add-unreadable-folder", ["index", "add", "{t}/idx", "{t}/imgs", "--workers", "0"], 2,
     "cannot read image directory", _deny(lambda t: t / "imgs")),
    ("remove-no-index", ["index", "remove", "{new}", "p0.png"], 2, "does not exist", None),
    # argparse gives the lone argument to PATH; resolve_store then asks for INDEX (misleading, but one line)
    ("remove-no-paths", ["index", "remove", "{t}/idx"], 2, "or --store NAME", None),
    ("info-no-index", ["index", "info", "{new}"], 2, "does not exist", None),
    ("info-a-file", ["index", "info", "{t}/afile"], 2, "afile", None),
    ("info-corrupt-manifest", ["index", "info", "{t}/corrupt"], 2, "corrupt", None),
    ("search-empty-query", ["search", "{t}/idx", "  "], 2, "empty query", None),
    ("search-k-zero", ["search", "{t}/idx", "red", "-k", "0"], 2, "-k must be", None),
    ("search-k-not-a-number", ["search", "{t}/idx", "red", "-k", "ten"], 2, "invalid int value", None),
    ("search-unknown-column", ["search", "{t}/idx", "red", "--where", "colour = 'red'"], 2, "unknown column", None),
    ("search-sql-injection", ["search", "{t}/idx", "red", "--where", "camera = 'c1'; DROP TABLE items"], 2,
     "unexpected character ';'", None),
    ("search-subquery", ["search", "{t}/idx", "red", "--where", "camera IN (SELECT path FROM items)"], 2,
     "expected a value", None),
    ("search-int-over-64-bits", ["search", "{t}/idx", "red", "--where", "time = 99999999999999999999999"], 2,
     "out of range", None),
    ("search-int-of-5000-digits", ["search", "{t}/idx", "red", "--where", "time > " + "9" * 5000], 2,
     "out of range", None),
    ("search-unterminated-string", ["search", "{t}/idx", "red", "--where", "camera = 'c1"], 2, "unterminated", None),
    ("search-text-and-image", ["search", "{t}/idx", "red", "--image", "{t}/q.png"], 2, "not both", None),
    ("search-image-missing", ["search", "{t}/idx", "--image", "{t}/nope.png"], 2, "does not exist", None),
    ("search-image-not-an-image", ["search", "{t}/idx", "--image", "{t}/junk.jpg"], 2, "not an image", None),
    ("search-image-bomb", ["search", "{t}/idx", "--image", "{t}/bomb.png"], 2, "over the limit", None),
    ("search-no-index", ["search", "{new}", "red"], 2, "does not exist", None),
    ("search-nprobe-zero", ["search", "{t}/idx", "red", "--nprobe", "0"], 2, "--nprobe", None),
    ("search-other-model", ["search", "{t}/idx", "red", "--checkpoint", "{t}/other.pt"], 2, "does not match", None),
    ("search-checkpoint-changed", ["search", "{t}/idx2", "red"], 2, "has changed since index", None),
    ("search-rescore-zero", ["search", "{t}/idx", "red", "--rescore", "0"], 2, "--rescore must be", None),
    ("search-rescore-mode-alone", ["search", "{t}/idx", "red", "--rescore-mode", "itm"], 2, "need --rescore", None),
    ("serve-port-range", ["serve", "{t}/idx", "--port", "70000"], 2, "--port must be", None),
    ("serve-empty-token", ["serve", "{t}/idx", "--token", "  "], 2, "--token is empty", None),
    ("serve-max-batch-zero", ["serve", "{t}/idx", "--max-batch", "0"], 2, "--max-batch", None),
    ("serve-threads-zero", ["serve", "{t}/idx", "--threads", "0"], 2, "--threads", None),
    ("serve-rerank-depth-zero", ["serve", "{t}/idx", "--rerank-depth", "0"], 2, "--rerank-depth", None),
    ("serve-rescore-and-rerank", ["serve", "{t}/idx", "--rescore", "--rerank", "jaccard"], 2, "alternatives", None),
    ("serve-no-index", ["serve", "{new}", "--port", "0"], 2, "does not exist", None),
    ("serve-other-model", ["serve", "{t}/idx", "--port", "0", "--checkpoint", "{t}/other.pt"], 2, "does not match",
     None),
    ("serve-checkpoint-changed", ["serve", "{t}/idx2", "--port", "0"], 2, "has changed since index", None),
]


def _snapshot(folder: pathlib.Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_changes_nothing(case, world, capsys, monkeypatch):
    name, argv, code, fragment, patch = case
    new = world / "runs" / name / "new"
    argv = [a.replace("{t}", str(world)).replace("{new}", str(new)) for a in argv]
    before = {k: _snapshot(world / k) for k in ("idx", "idx2", "imgs", "junk", "empty")}
    if patch is not None:
        patch(monkeypatch, world)
    threads = torch.get_num_threads()  # tbps serve sets them before loading the model
    by_argparse = False
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse's own errors
        rc, by_argparse = e.code, True
    finally:
        monkeypatch.undo()
        torch.set_num_threads(threads)
    out, err = capsys.readouterr()
    assert rc == code, (name, rc, err)
    assert "Traceback" not in err and "Traceback" not in out
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and fragment in errors[0], (name, err)
    assert len(err.strip().splitlines()) == 1 or by_argparse, (name, err)  # argparse adds its usage lines
    assert out == "", (name, out)  # nothing half-printed
    assert not new.exists() and not (world / "runs" / name).exists(), f"{name} left {new}"
    assert not (world / "afile").is_dir() and not (world / "junk" / "manifest.json").exists()
    assert {k: _snapshot(world / k) for k in before} == before, f"{name} changed an existing file"


def test_the_table_is_large_and_names_every_command():
    commands = {tuple(c[1][:2]) if c[1][0] == "index" else (c[1][0],) for c in CASES}
    assert commands == {("index", "build"), ("index", "add"), ("index", "remove"), ("index", "info"), ("search",),
                        ("serve",)}
    assert len(CASES) >= 50


def test_options_before_the_query(world, capsys):
    import json

    assert main(["search", str(world / "idx"), "-k", "3", "--json", "a red coat"]) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["query"] == "a red coat" and len(first["results"]) == 3
    assert main(["search", "-k", "3", str(world / "idx"), "a red coat", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["results"] == first["results"]


def test_unreadable_subfolder_is_one_warning_line(world, tmp_path, capsys, monkeypatch):
    _images(tmp_path / "g" / "cam1", 2)
    _images(tmp_path / "g" / "cam2", 3)
    _deny(lambda t: tmp_path / "g" / "cam2")(monkeypatch, world)
    rc = main(["index", "build", str(tmp_path / "ix"), "--checkpoint", str(world / "ckpt.pt"), "--images",
               str(tmp_path / "g"), "--recursive", "--workers", "0", "--no-progress", "--json"])
    monkeypatch.undo()
    out, err = capsys.readouterr()
    assert rc == 0 and '"count": 2' in out
    warnings = [line for line in err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and str(tmp_path / "g" / "cam2") in warnings[0] and "Permission denied" in warnings[0]


def test_csv_integers_over_64_bits_are_kept_as_text(world, tmp_path, capsys):
    (tmp_path / "big.csv").write_text("file,person_id\np0.png,99999999999999999999999\np1.png,3\n")
    rc = main(["index", "build", str(tmp_path / "ix"), "--checkpoint", str(world / "ckpt.pt"), "--images",
               str(world / "imgs"), "--metadata", str(tmp_path / "big.csv"), "--workers", "0", "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    capsys.readouterr()
    assert main(["search", str(tmp_path / "ix"), "red", "--where", "person_id = '99999999999999999999999'",
                 "--json"]) == 0
    assert '"person_id": "99999999999999999999999"' in capsys.readouterr().out


def test_checkpoint_changed_message_says_when(world, capsys):
    assert main(["search", str(world / "idx2"), "red"]) == 2
    err = capsys.readouterr().err
    assert "built 20" in err and "last modified 20" in err and "--overwrite" in err


def test_search_into_a_closed_pipe_exits_quietly(world):
    # The real thing: a reader that has gone away before tbps writes (`tbps search ... | head -0`).
    code = (
        "import sys, tbps.cli.common as c; from tests.test_bad_inputs_index import fake_load_encoder;"
        "c.load_encoder = fake_load_encoder; from tbps.cli.main import main;"
        f"sys.exit(main(['search', {str(world / 'idx')!r}, 'red', '-k', '6', '--json']))"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(pathlib.Path(__file__).parents[1] / "src"),
                                                        str(pathlib.Path(__file__).parents[1])])}
    r, w = os.pipe()
    os.close(r)  # nobody will read
    proc = subprocess.run([sys.executable, "-c", code], stdout=w, stderr=subprocess.PIPE, env=env, timeout=120)
    os.close(w)
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stderr.decode().strip() == ""


@pytest.fixture(autouse=True)
def _clean_runs(world):
    yield
    shutil.rmtree(world / "runs", ignore_errors=True)
