"""Checkpoints are data, never code: crafted pickles are refused without running, every tbps
checkpoint loads with torch's restricted unpickler, .safetensors works wherever .pt does, and an
index manifest cannot name files outside its folder."""

from __future__ import annotations

import json
import math
import os
import pickle
from collections import OrderedDict

import numpy as np
import pytest
import torch

from tbps.cli.main import main
from tbps.models.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from tbps.retrieval.encoder import Encoder, create_untrained_checkpoint


class _Payload:
    """Unpickling this calls os.system: it writes the marker file (if anything runs it)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _evil_files(folder, marker):
    """The payload as torch.save's zip, torch's legacy format and a bare pickle (protocol 4)."""
    state = {"format": "tbps-checkpoint", "model": {}, "x": _Payload(marker)}
    files = {"zip": folder / "evil.pt", "legacy": folder / "evil_legacy.pt", "pickle": folder / "evil.pkl"}
    torch.save(state, files["zip"])
    torch.save(state, files["legacy"], _use_new_zipfile_serialization=False)
    files["pickle"].write_bytes(pickle.dumps(state, protocol=4))
    return files


@pytest.fixture()
def evil(tmp_path):
    marker = tmp_path / "PWNED"
    return _evil_files(tmp_path, marker), marker


def test_the_payload_is_real(tmp_path):
    """Control: an unrestricted unpickle of the crafted file does write the marker."""
    marker = tmp_path / "PWNED"
    files = _evil_files(tmp_path, marker)
    pickle.loads(files["pickle"].read_bytes())
    assert marker.exists()


@pytest.mark.parametrize("kind", ["zip", "legacy", "pickle"])
def test_crafted_pickle_is_refused_in_one_line_and_never_runs(evil, kind):
    files, marker = evil
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(files[kind])
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(str(files[kind]))
    assert "refusing to load" in msg and f"GLOBAL {os.system.__module__}.system" in msg
    assert not marker.exists()


def test_eval_cli_refuses_the_crafted_checkpoint(evil, tiny_dataset, capsys):
    files, marker = evil
    assert main(["eval", str(files["zip"]), "--data", str(tiny_dataset)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "refusing to load" in err and "Traceback" not in err
    assert not marker.exists()


def _index_naming(tmp_path, checkpoint):
    """An index built with a fake encoder whose manifest then names ``checkpoint`` (as a received index could)."""
    from tbps.index import build_index
    from tests.fake_encoder import FakeEncoder
    from tests.test_index import write_images

    write_images(tmp_path / "imgs", 3)
    build_index(tmp_path / "idx", FakeEncoder(embed_dim=8), tmp_path / "imgs", workers=0, progress=False,
                checkpoint=checkpoint)
    manifest = json.loads((tmp_path / "idx" / "manifest.json").read_text())
    assert manifest["checkpoint"] == str(checkpoint)
    return tmp_path / "idx"


def test_index_manifest_naming_a_crafted_checkpoint_search_and_serve(evil, tmp_path, capsys):
    files, marker = evil
    idx = _index_naming(tmp_path, files["zip"])
    assert main(["search", str(idx), "a man in red"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "refusing to load" in err
    pytest.importorskip("fastapi")
    from tbps.cli.serve import load_app

    with pytest.raises(CheckpointError, match="refusing to load"):
        load_app(idx)
    assert not marker.exists()


@pytest.mark.parametrize("name", ["../outside.npy", "/etc/passwd", "sub/features-1.npy", "..", "", 7, "symlink"])
def test_manifest_file_names_must_stay_in_the_index_folder(tmp_path, name, capsys):
    from tbps.index import GalleryIndex, IndexFormatError

    idx = _index_naming(tmp_path, tmp_path / "none.pt")
    mpath = idx / "manifest.json"
    manifest = json.loads(mpath.read_text())
    if name == "symlink":  # a plain name, but a link to a file outside the folder
        (tmp_path / "outside.npy").write_bytes((idx / manifest["files"]["features"]).read_bytes())
        (idx / "link.npy").symlink_to(tmp_path / "outside.npy")
        name = "link.npy"
    manifest["files"]["features"] = name
    mpath.write_text(json.dumps(manifest))
    with pytest.raises(IndexFormatError, match="unsafe index manifest"):
        GalleryIndex.open(idx)
    assert main(["index", "info", str(idx)]) == 2
    assert "unsafe index manifest" in capsys.readouterr().err


def test_symlink_inside_the_index_folder_is_accepted(tmp_path):
    from tbps.index import GalleryIndex

    idx = _index_naming(tmp_path, tmp_path / "none.pt")
    manifest = json.loads((idx / "manifest.json").read_text())
    (idx / "link.npy").symlink_to(idx / manifest["files"]["features"])
    manifest["files"]["features"] = "link.npy"
    (idx / "manifest.json").write_text(json.dumps(manifest))
    with GalleryIndex.open(idx) as ix:
        assert len(ix) == 3


def _nested_state():
    return {
        "model": OrderedDict([("a.weight", torch.randn(3, 2)), ("a.bias", torch.arange(3)),
                              ("flag", torch.tensor([True, False]))]),
        "optimizer": {"state": {0: {"step": torch.tensor(4.0), "exp_avg": torch.zeros(2)}},
                      "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "params": [0, 1], "fused": None}]},
        "recipe": {"data": {"max_words": 42}, "tags": ["x", "y"], "__odd__": 1},
        "history": [{"epoch": 1.0, "val": float("nan")}], "best": None, "dtype": torch.float16,
        "size": torch.Size([2, 3]), "score": np.float64(0.25),
    }


def _same(a, b):
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    return type(a) is type(b) and a == b


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_checkpoint_round_trip_is_exact_and_loads_without_code(tmp_path, suffix):
    state = _nested_state()
    path = save_checkpoint(tmp_path / f"c{suffix}", state)
    back = load_checkpoint(path)
    assert back.pop("path") == str(path) and back.pop("format") == "tbps-checkpoint" and back.pop("version") == 2
    state["score"] = 0.25  # numpy scalars are stored as the equal python number
    assert _same(state, back)
    if suffix == ".pt":
        torch.load(path, weights_only=True)  # the restricted unpickler takes it as is
    else:
        assert path.read_bytes()[8:9] == b"{"  # safetensors: a JSON header, no pickle


def test_state_that_would_need_code_is_not_written(tmp_path):
    with pytest.raises(TypeError, match=r"state\['rng'\]\['numpy'\] is a numpy.ndarray"):
        save_checkpoint(tmp_path / "c.pt", {"rng": {"numpy": np.zeros(3)}})
    assert not (tmp_path / "c.pt").exists()


def test_version_1_last_pt_with_numpy_rng_gets_a_hint(tmp_path):
    torch.save({"format": "tbps-checkpoint", "rng": {"numpy": np.random.get_state()}}, tmp_path / "last.pt")
    with pytest.raises(CheckpointError, match=r"GLOBAL numpy.*use the run's best.pt"):
        load_checkpoint(tmp_path / "last.pt")


def test_foreign_safetensors_is_not_a_tbps_checkpoint(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(CheckpointError, match="not a tbps checkpoint"):
        load_checkpoint(tmp_path / "x.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_checkpoint(tmp_path / "bad.safetensors")


def test_safetensors_checkpoint_works_where_pt_does(tmp_path, tiny_dataset, capsys):
    """Same features from .pt and .safetensors; eval, index build and search through the CLI;
    a run folder holding only best.safetensors."""
    pt = create_untrained_checkpoint(tmp_path / "run" / "best.pt", arch="micro-vit", seed=5)
    st = tmp_path / "st" / "best.safetensors"
    assert main(["export", "safetensors", str(pt), str(st)]) == 0
    a, b = Encoder.from_checkpoint(pt), Encoder.from_checkpoint(st.parent)  # the folder finds best.safetensors
    px = torch.rand(2, 3, *a.image_size)
    assert np.array_equal(a.encode_images(px), b.encode_images(px))
    assert np.array_equal(a.encode_texts(["a red coat"]), b.encode_texts(["a red coat"]))
    capsys.readouterr()
    assert main(["eval", str(st), "--data", str(tiny_dataset), "--json"]) == 0
    assert main(["eval", str(pt), "--data", str(tiny_dataset), "--json"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert json.loads(out[0]) == json.loads(out[-1])
    from tests.test_index import write_images

    write_images(tmp_path / "imgs", 4)
    assert main(["index", "build", str(tmp_path / "idx"), "--checkpoint", str(st), "--images",
                 str(tmp_path / "imgs"), "--workers", "0", "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["search", str(tmp_path / "idx"), "a red coat", "-k", "2", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["results"]) == 2


def test_weights_that_do_not_fit_the_spec_are_one_line(tmp_path):
    from tbps.models.checkpoint import load_model

    ckpt = load_checkpoint(create_untrained_checkpoint(tmp_path / "a.pt", arch="micro-vit"))
    del ckpt["model"][next(iter(ckpt["model"]))]
    save_checkpoint(tmp_path / "b.safetensors", ckpt)
    with pytest.raises(CheckpointError, match=r"b.safetensors: its weights do not fit its model_spec \(micro-vit\)"
                                              r".*Missing key") as e:
        load_model(tmp_path / "b.safetensors")
    assert "\n" not in str(e.value)
