"""The TextReID recipe end to end: train in-process, evaluate, encode open-vocabulary queries."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tbps.recipes.config import load_recipe
from tbps.models.checkpoint import load_checkpoint
from tbps.engine.train import TrainJob, train

# The micro architecture with the hash-seeded word dictionary (no MiniLM load in tests).
TEXTREID_MICRO = [
    "model.embed_dim=24",
    "model.text_tower.source=random",
    "model.text_tower.hidden=16",
    "data.identity_k=2",
    "losses.cmmoco.queue_size=16",
    "optim.warmup_epochs=0.5",
    "optim.milestones=[100]",
    "losses.align.weight=1.0",  # off in the CPU recipe; exercised here
]


def _job(data, out, overrides, recipe="textreid-cpu", **kw):
    return TrainJob(data_root=str(data), recipe=load_recipe(recipe, overrides), out_dir=str(out), progress=False, **kw)


def test_textreid_trains_resumes_and_serves_open_vocabulary(tiny_dataset, micro_overrides, tmp_path, monkeypatch):
    monkeypatch.setenv("TBPS_CACHE", str(tmp_path / "cache"))
    over = micro_overrides + TEXTREID_MICRO
    summary = train(_job(tiny_dataset, tmp_path / "a", over, epochs=2))
    assert summary["finished"]
    ckpt = load_checkpoint(tmp_path / "a" / "last.pt")
    # The queues and the key encoder are part of the objective's state (exact resume).
    keys = ckpt["objective"].keys()
    assert "cmmoco.image_queue.feats" in keys and any(k.startswith("cmmoco.key_encoder.") for k in keys)
    ids = ckpt["objective"]["cmmoco.text_queue.ids"]
    assert ids.shape == (16,) and (ids >= 0).all()  # filled by 2 epochs of batches of 8
    assert list((tmp_path / "cache" / "word_vectors").glob("random-*.pt"))  # vocabulary cached once
    # Resume after one epoch gives the same weights as the uninterrupted run.
    train(_job(tiny_dataset, tmp_path / "b", over, epochs=2, stop_after_epochs=1))
    train(_job(tiny_dataset, tmp_path / "b", over, resume=True))
    sa, sb = ckpt["model"], load_checkpoint(tmp_path / "b" / "last.pt")["model"]
    assert all(torch.allclose(sa[k], sb[k], atol=1e-6) for k in sa)

    from tbps.retrieval.encoder import Encoder

    enc = Encoder.from_checkpoint(tmp_path / "a" / "last.pt")
    feats = enc.encode_texts(["a man in a crimson cardigan with a rucksack", "a man in a red sweater"])
    assert feats.shape == (2, 24) and np.isfinite(feats).all()
    assert "rucksack" in enc.tokenizer.dictionary.index  # encoded on the fly, not an unknown token
    assert not np.allclose(feats[0], feats[1])


def test_cmmoco_as_an_extra_loss_of_tbps_clip():
    from tbps.models import ModelSpec, create_model, get_tokenizer
    from tbps.objectives import StepContext, build_objective

    torch.manual_seed(0)
    model = create_model(ModelSpec(arch="micro-vit"))
    losses = {"citc": {"weight": 0.1}, "cmmoco": {"queue_size": 8, "weight": 0.5}}
    obj = build_objective("tbps-clip-cmmoco", model, losses, num_identities=5)
    tok = get_tokenizer(model.spec)
    batch = {"image": torch.randn(4, 3, 32, 16), "tokens": tok(["a", "red coat", "blue", "bag"]),
             "pid": torch.tensor([0, 1, 2, 3])}
    calls = []
    real = model.encode_image
    model.encode_image = lambda x: calls.append(1) or real(x)  # count online image passes
    out = obj(model, batch, StepContext(0.5, 1, 0))
    assert {"nitc_loss", "ritc_loss", "citc_loss", "cmmoco_loss"} <= set(out)
    assert len(calls) == 1  # CM-MoCo reuses TBPS-CLIP's features instead of encoding again
    assert out["cmmoco_loss"].item() == pytest.approx(0.0, abs=1e-6)  # empty queue: positive only
    batch["pid"] = torch.tensor([4, 4, 4, 4])
    out = obj(model, batch, StepContext(0.6, 1, 1))
    assert out["cmmoco_loss"].item() > 0 and (obj.cmmoco.text_queue.ids >= 0).all()
    sum(v for k, v in out.items() if k.endswith("_loss")).backward()
    assert model.clip.visual.conv1.weight.grad is not None


def test_bad_cmmoco_settings_are_named(tiny_dataset, micro_overrides, tmp_path):
    from tbps.recipes.config import ConfigError

    with pytest.raises(ConfigError, match="queue_size 0"):
        train(_job(tiny_dataset, tmp_path / "d", micro_overrides + TEXTREID_MICRO + ["losses.cmmoco.queue_size=0"],
                   epochs=1))
