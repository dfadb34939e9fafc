"""The public API at the package top: a script trains, evaluates, indexes and searches without
importing a deep path, and gets the same numbers as the CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import tbps
from tbps.cli.main import main
from tests.conftest import MICRO


@pytest.fixture(scope="module")
def api_run(tiny_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("api-run")
    recipe = tbps.load_recipe("tbps-clip-cpu", MICRO + ["optim.lr=2e-3"])
    summary = tbps.train(tiny_dataset, recipe, out, epochs=2, progress=False)
    return out, summary


def test_import_is_cheap():
    code = "import sys, tbps; print(sorted(m for m in ('torch', 'open_clip', 'faiss', 'fastapi') if m in sys.modules))"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"


def test_load_recipe_applies_overrides():
    recipe = tbps.load_recipe("tbps-clip-cpu", ["optim.lr=5e-4", "data.batch_size=12"])
    assert recipe.optim.lr == 5e-4 and recipe.data.batch_size == 12
    assert tbps.load_recipe().name == "tbps-clip-cpu"


def test_train_then_evaluate_equals_the_cli(api_run, tiny_dataset, capsys):
    out, summary = api_run
    assert summary["finished"] and summary["global_step"] > 0
    metrics = tbps.evaluate(out / "best.pt", tiny_dataset, "test")
    assert main(["eval", str(out / "best.pt"), "--data", str(tiny_dataset), "--split", "test", "--json"]) == 0
    cli = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert metrics["t2i"] == cli["t2i"] and metrics["i2t"] == cli["i2t"]
    assert metrics["gallery"] > 0 and 0 <= metrics["t2i"]["R1"] <= 100


def test_index_and_search_through_the_api(api_run, tiny_dataset, tmp_path):
    out, _ = api_run
    encoder = tbps.load_encoder(out / "best.pt")
    stats = tbps.build_index(tmp_path / "idx", out / "best.pt", tiny_dataset / "imgs" / "test", workers=0,
                             progress=False)
    with tbps.open_index(tmp_path / "idx") as index:
        assert len(index) == stats["count"] > 0
        some = index.get(int(index.ids[3]))
        with open(some.path, "rb") as f:  # an image finds itself first
            from PIL import Image

            pixels = encoder.preprocess(Image.open(f).convert("RGB"))
        hits = index.search(encoder.encode_images(pixels[None]), k=3)[0]
    assert hits[0].id == some.id and hits[0].score == pytest.approx(1.0, abs=1e-4)


def test_retrieval_metrics_by_hand():
    # Gallery ids (3, 1, 2). Query id 1: its one match ranks 2nd (AP = INP = 1/2); query id 2: 3rd (1/3).
    sim = torch.tensor([[0.9, 0.5, 0.1], [0.8, 0.7, 0.6]])
    m = tbps.retrieval_metrics(sim, np.array([1, 2]), np.array([3, 1, 2]))
    assert m["R1"] == 0.0 and m["R5"] == 100.0
    assert m["mAP"] == pytest.approx(100 * (1 / 2 + 1 / 3) / 2, abs=1e-4)
    assert m["mINP"] == pytest.approx(100 * (1 / 2 + 1 / 3) / 2, abs=1e-4)
