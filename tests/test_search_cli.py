"""`tbps index ...` and `tbps search` called in-process through `tbps.cli.main.main`."""

from __future__ import annotations

import json
import os
import pathlib
import sys

import numpy as np
import pytest

from tbps.cli.main import main
from tbps.index import GalleryIndex
from tbps.threads import torch_threads
from tests.fake_encoder import FakeEncoder

sys.path.insert(0, os.path.dirname(__file__))
from test_index import write_images  # noqa: E402


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.fixture()
def built(tmp_path, fake_models, capsys):
    imgs = tmp_path / "imgs"
    paths = write_images(imgs, 15)
    (imgs / "broken.jpg").write_bytes(b"nope")
    csv = tmp_path / "meta.csv"
    csv.write_text("file,camera,time\n" + "".join(f"{p.name},c{i % 3},2024-01-{i + 1:02d}\n" for i, p in enumerate(paths)))
    rc, out, err = run_cli(capsys, "index", "build", tmp_path / "idx", "--checkpoint", fake_models[0],
                           "--images", imgs, "--metadata", csv, "--workers", "0", "--no-progress", "--json")
    assert rc == 0, err
    stats = json.loads(out)
    assert stats["count"] == 15 and stats["skipped_count"] == 1
    assert "tbps: skipped" in err and "broken.jpg" in err
    return tmp_path / "idx", paths


def test_info_json_and_text(built, capsys):
    idx, _ = built
    rc, out, _ = run_cli(capsys, "index", "info", idx, "--json")
    info = json.loads(out)
    assert rc == 0 and info["count"] == 15 and info["csv_columns"] == ["camera", "time"]
    assert info["checkpoint"].endswith("fake0.pt") and info["search_mode"] == "exact"
    rc, out, _ = run_cli(capsys, "index", "info", idx)
    assert rc == 0 and "15 x 32-d" in out and "camera, time" in out


def test_search_text_json_matches_library(built, capsys):
    idx, _ = built
    rc, out, err = run_cli(capsys, "search", idx, "a man in a black jacket with a red backpack", "-k", "4", "--json")
    assert rc == 0, err
    res = json.loads(out)
    assert [r["rank"] for r in res["results"]] == [1, 2, 3, 4]
    q = FakeEncoder(embed_dim=32, seed=0).encode_texts(["a man in a black jacket with a red backpack"])
    expected = GalleryIndex.open(idx).search(q, k=4)[0]
    assert [r["path"] for r in res["results"]] == [h.path for h in expected]
    np.testing.assert_allclose([r["score"] for r in res["results"]], [h.score for h in expected], atol=1e-6)
    # Table output.
    rc, out, _ = run_cli(capsys, "search", idx, "red backpack", "-k", "2")
    lines = out.strip().splitlines()
    assert rc == 0 and lines[0].split() == ["rank", "score", "id", "path"] and len(lines) == 3


def test_search_with_filter_and_large_k(built, capsys):
    idx, paths = built
    rc, out, _ = run_cli(capsys, "search", idx, "person", "-k", "100", "--json",
                         "--where", "camera = 'c1' AND time >= '2024-01-05'")
    names = {pathlib.Path(r["path"]).name for r in json.loads(out)["results"]}
    assert rc == 0 and names == {p.name for i, p in enumerate(paths) if i % 3 == 1 and i >= 4}
    rc, out, _ = run_cli(capsys, "search", idx, "person", "-k", "1000", "--json")
    assert len(json.loads(out)["results"]) == 15


def test_search_by_image_finds_itself(built, capsys):
    idx, paths = built
    rc, out, _ = run_cli(capsys, "search", idx, "--image", paths[6], "-k", "3", "--json")
    top = json.loads(out)["results"][0]
    assert rc == 0 and top["path"] == str(paths[6].resolve()) and top["score"] == pytest.approx(1.0, abs=1e-5)
    assert top["metadata"]["camera"] == "c0"


@pytest.mark.parametrize(
    "argv,message",
    [
        (["   "], "empty query"),
        (["text", "-k", "0"], "-k must be a positive integer"),
        (["text", "--where", "cam = 'c1'"], "unknown column 'cam'"),
        (["text", "--where", "camera = 'c3'; DROP TABLE items"], "unexpected character ';'"),
        (["--image", "/no/such.jpg"], "does not exist"),
    ],
)
def test_search_user_errors_are_one_line(built, capsys, argv, message):
    idx, _ = built
    rc, out, err = run_cli(capsys, "search", idx, *argv)
    assert rc == 2 and err.startswith("tbps: error:") and message in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_search_refuses_other_checkpoint(built, capsys, fake_models):
    idx, _ = built
    rc, _, err = run_cli(capsys, "search", idx, "text", "--checkpoint", fake_models[1])
    assert rc == 2 and "does not match" in err and "checkpoint_sha256" in err


def test_add_and_remove_cli(built, capsys, tmp_path):
    idx, paths = built
    write_images(tmp_path / "imgs", 3, seed=4, start=200)
    rc, out, _ = run_cli(capsys, "index", "add", idx, tmp_path / "imgs", "--workers", "0", "--no-progress", "--json")
    st = json.loads(out)
    assert rc == 0 and st["added"] == 3 and st["count"] == 18 and st["skipped_count"] == 1
    rc, out, err = run_cli(capsys, "index", "remove", idx, paths[0], "missing.jpg", "--json")
    assert rc == 0 and json.loads(out)["removed"] == 1 and "missing.jpg is not in the index" in err
    rc, _, _ = run_cli(capsys, "index", "remove", idx, "missing.jpg")
    assert rc == 1
    assert len(GalleryIndex.open(idx)) == 17
    rc, _, err = run_cli(capsys, "index", "info", tmp_path / "nothing")
    assert rc == 2 and "does not exist" in err


def test_end_to_end_with_real_encoder(tmp_path, capsys):
    """`create_untrained_checkpoint` + the real `Encoder`, through the CLI."""
    pytest.importorskip("torch")
    inference = pytest.importorskip("tbps.retrieval.encoder")
    with torch_threads(1):  # restored after, for the tests that follow
        ckpt = inference.create_untrained_checkpoint(tmp_path / "ckpt" / "best.pt")
        paths = write_images(tmp_path / "imgs", 12)
        rc, out, err = run_cli(capsys, "index", "build", tmp_path / "idx", "--checkpoint", ckpt, "--images",
                               tmp_path / "imgs", "--workers", "0", "--no-progress", "--json")
        assert rc == 0, err
        assert json.loads(out)["count"] == 12
        rc, out, err = run_cli(capsys, "search", tmp_path / "idx", "a woman with a red bag", "-k", "5", "--json")
        assert rc == 0, err
        res = json.loads(out)["results"]
        assert len(res) == 5 and all(-1.0001 <= r["score"] <= 1.0001 for r in res)
        enc = inference.Encoder.from_checkpoint(ckpt)
        GalleryIndex.open(tmp_path / "idx").check_encoder(enc)
        rc, out, _ = run_cli(capsys, "search", tmp_path / "idx", "--image", paths[2], "-k", "1", "--json")
        assert json.loads(out)["results"][0]["path"] == str(paths[2].resolve())
        # A different checkpoint (other random weights) is refused.
        other = inference.create_untrained_checkpoint(tmp_path / "other" / "best.pt", seed=1)
        rc, _, err = run_cli(capsys, "search", tmp_path / "idx", "x", "--checkpoint", other)
        assert rc == 2 and "does not match" in err


def test_ivf_index_through_the_cli(tmp_path, fake_models, capsys):
    pytest.importorskip("faiss")
    write_images(tmp_path / "imgs", 80, seed=2)
    rc, out, err = run_cli(capsys, "index", "build", tmp_path / "idx", "--checkpoint", fake_models[0], "--images",
                           tmp_path / "imgs", "--workers", "0", "--no-progress", "--search-mode", "ivf", "--json")
    assert rc == 0 and json.loads(out)["search_mode"] == "ivf", err
    rc, out, _ = run_cli(capsys, "index", "info", tmp_path / "idx")
    assert "search:      ivf" in out and "nprobe" in out
    rc, approx, _ = run_cli(capsys, "search", tmp_path / "idx", "red bag", "-k", "5", "--json", "--nprobe", "64")
    rc2, exact, _ = run_cli(capsys, "search", tmp_path / "idx", "red bag", "-k", "5", "--json", "--exact")
    assert rc == rc2 == 0 and json.loads(exact)["search_mode"] == "exact"
    assert [r["id"] for r in json.loads(approx)["results"]] == [r["id"] for r in json.loads(exact)["results"]]
    rc, _, err = run_cli(capsys, "search", tmp_path / "idx", "red bag", "--nprobe", "0")
    assert rc == 2 and "--nprobe must be a positive integer" in err


def test_search_shows_unseen_words_on_stderr_and_in_json(built, capsys, monkeypatch):
    idx, _ = built
    monkeypatch.setattr(FakeEncoder, "unknown_words",
                        lambda self, text: {"rucksack": [("backpack", 0.7), ("bag", 0.3)]} if "rucksack" in text else {})
    rc, out, err = run_cli(capsys, "search", idx, "a man with a rucksack", "-k", "2", "--json")
    assert rc == 0, err
    assert json.loads(out)["unknown_words"] == {"rucksack": {"backpack": 0.7, "bag": 0.3}}
    assert 'tbps: "rucksack" (not in the training vocabulary) -> backpack (0.70), bag (0.30)' in err
    rc, out, err = run_cli(capsys, "search", idx, "a man with a backpack", "-k", "2", "--json")
    assert json.loads(out)["unknown_words"] == {} and "not in the training vocabulary" not in err
