"""Every paper recipe's objective, losses and optimiser (tiny architecture, batch 2): one real
optimiser step gives finite losses and moves the parameters. Full size lives in bench/paper_scale.py."""

from __future__ import annotations

import pytest
import torch

PAPER = ("tbps-clip", "tbps-clip-simplified", "irra", "textreid", "mefa", "laip")
TINY = ["model.arch=micro-vit", "model.pretrained=null", "model.image_size=[32, 16]", "model.context_length=32",
        "data.num_workers=0", "data.text_augment=null"]
EXTRA = {
    "irra": ["losses.fusion.width=32", "losses.fusion.heads=2"],
    "laip": ["losses.fusion.width=32", "losses.fusion.heads=2", "losses.itc.queue_size=16"],
    # no CLIP weights here: hash-seeded word vectors instead of CLIP's dictionary
    "textreid": ["model.embed_dim=24", "model.text_tower.source=random", "model.text_tower.hidden=16",
                 "losses.cmmoco.queue_size=16"],
    "mefa": ["losses.imr_text.tiers=[1, 2]", "losses.imr_text.mlm=null", "losses.imr_image.top_k=1"],
}


def _step(name: str, root):
    from tests.conftest import objective_setup
    from tbps.engine.optim import build_optimizer, lr_at, set_lr
    from tbps.objectives import StepContext
    from tbps.recipes.config import load_recipe

    recipe = load_recipe(name, TINY + EXTRA.get(name, []))
    model, ds, obj, epoch, collate = objective_setup(recipe, root)
    batch = collate([ds[0], ds[len(ds) // 2]])  # batch 2
    opt = build_optimizer({"model": model, "objective": obj}, recipe.optim)
    set_lr(opt, lr_at(epoch + 0.5, epoch + 1, recipe.optim))
    params = [p for p in list(model.parameters()) + list(obj.parameters()) if p.requires_grad]
    before = [p.detach().clone() for p in params]
    model.train(), obj.train()
    out = obj(model, batch, StepContext(epoch=epoch + 0.5, total_epochs=epoch + 1, step=0))
    loss = sum(v for k, v in out.items() if k.endswith("_loss"))
    opt.zero_grad()
    loss.backward()
    opt.step()
    obj.after_step(model)
    return out, params, before


@pytest.mark.parametrize("name", PAPER)
def test_one_optimiser_step_of_each_paper_recipe(name, tiny_dataset, monkeypatch, tmp_path):
    monkeypatch.setenv("TBPS_CACHE", str(tmp_path / "cache"))
    out, params, before = _step(name, tiny_dataset)
    losses = {k: v for k, v in out.items() if k.endswith("_loss")}
    assert len(losses) >= 2, sorted(out)
    assert all(torch.isfinite(v).all() for v in out.values()), {k: float(v) for k, v in losses.items()}
    graded = [(p, b) for p, b in zip(params, before) if p.grad is not None and bool(p.grad.abs().sum() > 0)]
    changed = sum(not torch.equal(p.detach(), b) for p, b in graded)
    assert graded and changed >= 0.9 * len(graded), f"{changed} of {len(graded)} trained tensors moved"
