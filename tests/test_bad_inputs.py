"""Bad inputs a new user types, driven through the real `tbps` entry point in-process: each gets exit
status 2 and one line naming what is wrong, never a traceback, writes nothing (no half run folder,
no half dataset) and leaves what was there byte-identical. Options are checked before any work, so
most cases end in milliseconds. (The index, search and serve cases live in their own file.)"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from tbps.cli.main import main
from tests.conftest import MICRO

NO_GPU = not torch.cuda.is_available()
M = list(MICRO)

# (argv with {data} {small} {run} {ckpt} {file} {tmp} placeholders, exit status, fragment of the one line)
CASES = [
    # train: the run folder
    (["train", "--data", "{data}", "--out", "{run}", *M], 2, "is not empty"),
    (["train", "--data", "{data}", "--out", "{run}", "--resume", "{run}", "--overwrite"], 2,
     "pass one of them"),
    (["train", "--data", "{data}", "--out", "{file}", *M], 2, "is not a folder"),
    (["train", "--resume", "{tmp}/nowhere"], 2, "no such run folder"),
    (["train", "--resume", "{data}"], 2, "no last.pt there"),
    (["train", "--resume", "{data}", "--data", "{data}"], 2, "no last.pt there"),
    (["train", "--resume", "{run}", "optim.lr=1"], 2, "its own recipe"),
    (["train", "--resume", "{run}", "--out", "{tmp}/elsewhere"], 2, "drop --out"),
    (["train", "--resume", "{run}", "--init", "{ckpt}"], 2, "pass one of them"),
    (["train", "--data", "{data}", "--out", "{tmp}/new", "--init", "{tmp}/none.pt", *M], 2, "no such checkpoint"),
    (["train", "--out", "{tmp}/new", *M], 2, "--data ROOT is required"),
    (["train", "--data", "{tmp}/nodata", "--out", "{tmp}/new", *M], 2, "does not exist"),
    # train: numbers out of range, before any work
    (["train", "--data", "{data}", "--out", "{tmp}/new", "--epochs", "0", *M], 2, "--epochs must be a positive"),
    (["train", "--data", "{data}", "--out", "{tmp}/new", "--epochs", "-2", *M], 2, "--epochs must be a positive"),
    (["train", "--data", "{data}", "--out", "{tmp}/new", "--time-budget", "nan", *M], 2, "--time-budget must be"),
    (["train", "--data", "{data}", "--out", "{tmp}/new", "--time-budget", "0", *M], 2, "--time-budget must be"),
    (["train", "--data", "{data}", "--out", "{tmp}/new", "--time-budget", "-1", *M], 2, "--time-budget must be"),
    (["train", "--data", "{data}", "--out", "{tmp}/new", "--time-budget", "inf", *M], 2, "--time-budget must be"),
    (["train", "--data", "{data}", "--out", "{tmp}/new", *M, "data.batch_size=-4"], 2, "data.batch_size: must be > 0"),
    (["train", "--data", "{data}", "--out", "{tmp}/new", *M, "data.batch_size=0"], 2, "data.batch_size: must be > 0"),
    (["train", "--data", "{data}", "--out", "{tmp}/new", *M, "data.batch_size=2.5"], 2,
     "data.batch_size: expected an integer"),
    (["train", "--data", "{data}", "--out", "{tmp}/new", *M, "data.batch_size=true"], 2,
     "data.batch_size: expected an integer"),
    (["train", "--data", "{data}", "--out", "{tmp}/new", *M, "data.num_workers=-1"], 2, "data.num_workers: must be"),
    (["train", "--data", "{data}", "--out", "{tmp}/new", *M, "data.eval_batch_size=0"], 2, "data.eval_batch_size"),
    (["train", "--data", "{data}", "--out", "{tmp}/new", *M, "data.max_words=0"], 2, "data.max_words"),
    (["train", "--data", "{data}", "--out", "{tmp}/new", *M, "data.text_augment.deletion_prob=1.5"], 2,
     "data.text_augment.deletion_prob: must be in [0, 1]"),
    (["train", "--data", "{data}", "--out", "{tmp}/new", *M, "data.augment.pool=[blur]"], 2, "unknown augmentation"),
    (["train", "--data", "{data}", "--out", "{tmp}/new", *M, "optim.lr=-1"], 2, "optim.lr: must be >= 0"),
    (["train", "--data", "{data}", "--out", "{tmp}/new", *M, "optim.lr="], 2, "no value after '='"),
    (["train", "--data", "{data}", "--out", "{tmp}/new", *M, "optim.lr=nan"], 2, "optim.lr: expected a finite"),
    (["train", "--data", "{data}", "--out", "{tmp}/new", *M, "optim.lr=fast"], 2, "optim.lr: expected a number"),
    (["train", "--data", "{data}", "--out", "{tmp}/new", *M, "optim.lr=null"], 2, "optim.lr: a value is required"),
    (["train", "--data", "{data}", "--out", "{tmp}/new", *M, "optim.betas=[0.9]"], 2, "optim.betas: expected 2"),
    (["train", "--data", "{data}", "--out", "{tmp}/new", *M, "optim.betas=[0.9, 1.5]"], 2, "optim.betas: must be"),
    (["train", "--data", "{data}", "--out", "{tmp}/new", *M, "optim.name=rmsprop"], 2, "optim.name: expected one of"),
    (["train", "--data", "{data}", "--out", "{tmp}/new", *M, "optim.schedule=linear"], 2, "optim.schedule"),
    (["train", "--data", "{data}", "--out", "{tmp}/new", *M, "optim.lr_factors={a: -1}"], 2, "optim.lr_factors"),
    (["train", "--data", "{data}", "--out", "{tmp}/new", *M, "train.epochs=0"], 2, "train.epochs: must be > 0"),
    (["train", "--data", "{data}", "--out", "{tmp}/new", *M, "train.eval_every=0"], 2, "train.eval_every"),
    (["train", "--data", "{data}", "--out", "{tmp}/new", *M, "train.seed=-1"], 2, "train.seed"),
    (["train", "--data", "{data}", "--out", "{tmp}/new", *M, "train.amp=maybe"], 2, "train.amp: expected true"),
    (["train", "--data", "{data}", "--out", "{tmp}/new", *M, "train.select_metric=R2"], 2, "train.select_metric"),
    (["train", "--data", "{data}", "--out", "{tmp}/new", *M, "model.image_size=[1,1]"], 2,
     "smaller than one 8-pixel patch"),
    (["train", "--data", "{data}", "--out", "{tmp}/new", *M, "model.image_size=5"], 2, "model.image_size: expected"),
    (["train", "--data", "{data}", "--out", "{tmp}/new", *M, "model.context_length=0"], 2, "model.context_length"),
    (["train", "--data", "{data}", "--out", "{tmp}/new", *M, "model.arch=no-such-net"], 2, "unknown architecture"),
    (["train", "--data", "{data}", "--out", "{tmp}/new", *M, "model.text_attn_dropout=1"], 2,
     "model.text_attn_dropout"),
    (["train", "--data", "{data}", "--out", "{tmp}/new", *M, "optim.lrr=1"], 2, "optim: unknown key"),
    (["train", "--data", "{data}", "--out", "{tmp}/new", *M, "optim.lr"], 2, "not KEY=VALUE"),
    (["train", "--data", "{data}", "--out", "{tmp}/new", *M, "optim..lr=1"], 2, "the key must be SECTION.KEY"),
    (["train", "--data", "{data}", "--out", "{tmp}/new", *M, "optim.lr=[1"], 2, "not valid YAML"),
    (["train", "--data", "{data}", "--out", "{tmp}/new", *M, "stages=5"], 2, "stages: expected a list"),
    (["train", "--data", "{data}", "--out", "{tmp}/new", "--recipe", "nope"], 2, "no recipe 'nope'"),
    (["train", "--data", "{data}", "--out", "{tmp}/new", "--device", "banana", *M], 2, "is not a device"),
    (["train", "--data", "{data}", "--out", "{tmp}/new", "--device", "cuda", *M], 2, "no CUDA GPU"),
    (["train", "--data", "{small}", "--out", "{tmp}/new", *M], 2, "fewer than one global batch"),
    # eval: options checked before the model loads
    (["eval", "{ckpt}", "--data", "{data}", "--batch-size", "0"], 2, "--batch-size must be a positive"),
    (["eval", "{ckpt}", "--data", "{data}", "--batch-size", "-3"], 2, "--batch-size must be a positive"),
    (["eval", "{ckpt}", "--data", "{data}", "--device", "cuda"], 2, "no CUDA GPU"),
    (["eval", "{ckpt}", "--data", "{data}", "--device", "cuda:x"], 2, "is not a device"),
    (["eval", "{ckpt}", "--data", "{data}", "--rescore", "-1"], 2, "--rescore must be"),
    (["eval", "{ckpt}", "--data", "{data}", "--rescore-weight", "nan"], 2, "--rescore-weight must be"),
    (["eval", "{tmp}/missing.pt", "--data", "{data}"], 2, "no such checkpoint"),
    (["eval", "{ckpt}", "--data", "{tmp}/nodata"], 2, "no such dataset folder"),
    (["eval", "{file}", "--data", "{data}"], 2, "cannot be read as a checkpoint"),
    (["eval", "{tmp}", "--data", "{data}"], 2, "without best.pt or last.pt"),
    (["eval", "{ckpt}", "--data", "{data}", "--split", "nope"], 2, "unknown split 'nope'"),
    # demo: checked before the dataset is written
    (["demo", "--out", "{tmp}/d", "--ids", "2", *M], 2, "--ids must be at least 3"),
    (["demo", "--out", "{tmp}/d", "--ids", "3", "--images-per-id", "1", *M], 2, "fewer than one batch"),
    (["demo", "--out", "{file}", "--ids", "3", *M], 2, "is not a folder"),
    (["demo", "--out", "{tmp}/d", "--minutes", "0", *M], 2, "--minutes must be"),
    (["demo", "--out", "{tmp}/d", "--minutes", "nan", *M], 2, "--minutes must be"),
    (["demo", "--out", "{tmp}/d", "--queries", "0", *M], 2, "--queries must be"),
    (["demo", "--out", "{tmp}/d", "--seed", "-1", *M], 2, "train.seed: must be >= 0"),
    (["demo", "--out", "{tmp}/d", *M, "data.batch_size=0"], 2, "data.batch_size: must be > 0"),
    (["demo", "--out", "{tmp}/d", "--recipe", "nope"], 2, "no recipe 'nope'"),
    (["demo", "--out", "{demo}", *M], 2, "holds the run of an earlier demo"),
    # synth
    (["synth", "/proc/x", "--ids", "3"], 2, "cannot write the dataset"),
    (["synth", "{tmp}/s", "--ids", "2"], 2, "--ids must be at least 3"),
    (["synth", "{tmp}/s", "--images-per-id", "0"], 2, "--images-per-id at least 1"),
    (["synth", "{tmp}/s", "--workers", "-1"], 2, "--workers must be 0 or more"),
    (["synth", "{tmp}/s", "--size", "8", "8"], 2, "at least 16 pixels"),
    (["synth", "{tmp}/s", "--seed", "-1"], 2, "seed must be 0 or more"),
    (["synth", "{file}"], 2, "is not a folder"),
]


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory):
    """3 identities x 1 view: two training pairs, fewer than one batch."""
    from tbps.synth import synthesize

    root = tmp_path_factory.mktemp("small")
    synthesize(root, ids=3, images_per_id=1, seed=0, image_size=(64, 32), workers=1, progress=False)
    return root


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from tbps.retrieval.encoder import create_untrained_checkpoint

    return create_untrained_checkpoint(tmp_path_factory.mktemp("ckpt") / "model.pt", arch="micro-vit")


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else b"<dir>") for p in sorted(root.rglob("*"))}


def _ids(case):
    argv, _, _ = case
    return " ".join(a.replace("{", "").replace("}", "") for a in argv if not a.startswith("model.") and a not in M)[:80]


@pytest.mark.parametrize("argv,code,fragment", CASES, ids=[_ids(c) for c in CASES])
def test_bad_input_is_one_line_and_writes_nothing(argv, code, fragment, tiny_dataset, small_dataset, checkpoint,
                                                  tmp_path, monkeypatch, capsys):
    if "cuda" in argv and "--device" in argv and not NO_GPU:
        pytest.skip("this machine has a GPU")
    work = tmp_path / "work"
    run, demo_run = work / "run", work / "demo" / "run"
    for folder in (run, demo_run):  # an earlier run: it must survive byte for byte
        folder.mkdir(parents=True)
        for name in ("best.pt", "last.pt", "config.yaml", "metrics.jsonl"):
            (folder / name).write_bytes(f"earlier {name}".encode())
    (work / "afile").write_text("not a folder")
    monkeypatch.chdir(work)  # where a default output (runs/RECIPE, demo/) would land
    before = _snapshot(work)
    values = {"data": tiny_dataset, "small": small_dataset, "run": run, "ckpt": checkpoint, "file": work / "afile",
              "tmp": work, "demo": work / "demo"}
    try:
        rc = main([a.format(**values) if "{" in a and "=" not in a else a for a in argv])
    except SystemExit as e:  # argparse
        rc = e.code
    err = capsys.readouterr().err
    assert rc == code, err[-2000:]
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("tbps: error:")]
    assert len(errors) == 1 and fragment in errors[0], err[-2000:]
    assert _snapshot(work) == before  # nothing written, nothing changed


def test_loading_a_checkpoint_does_not_warn_of_random_init(checkpoint, caplog):
    """open_clip warns "No pretrained weights loaded ... initialized randomly" for a model built without
    weights: true when training from scratch, false where a checkpoint's weights are loaded next."""
    from tbps.models.checkpoint import load_model
    from tbps.models.factory import create_model
    from tbps.models.spec import ModelSpec

    with caplog.at_level(logging.WARNING):
        load_model(checkpoint)
    assert not [r for r in caplog.records if "No pretrained weights" in r.getMessage()]
    with caplog.at_level(logging.WARNING):
        create_model(ModelSpec(arch="micro-vit"))  # from scratch: the warning is right, and still shown
    assert [r for r in caplog.records if "No pretrained weights" in r.getMessage()]


def test_overwrite_replaces_a_run_and_api_refuses_too(tiny_dataset, tmp_path, capsys):
    """--overwrite replaces the earlier run's files (and only those); tbps.train refuses a non-empty folder."""
    import tbps
    from tbps.engine.train import TrainError

    run = tmp_path / "run"
    run.mkdir()
    (run / "best.pt").write_bytes(b"earlier")
    (run / "notes.txt").write_text("mine")
    with pytest.raises(TrainError, match="is not empty"):
        tbps.train(tiny_dataset, tbps.load_recipe("tbps-clip-cpu", M), run, epochs=1, progress=False)
    assert (run / "best.pt").read_bytes() == b"earlier"
    assert main(["train", "--data", str(tiny_dataset), "--out", str(run), "--epochs", "1", "--overwrite",
                 "--no-progress", *M]) == 0
    assert (run / "best.pt").read_bytes() != b"earlier" and (run / "notes.txt").read_text() == "mine"
    assert {"last.pt", "config.yaml", "metrics.jsonl"} <= {p.name for p in run.iterdir()}
