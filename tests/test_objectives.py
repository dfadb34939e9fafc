"""Every registered objective, built from its CPU recipe on the micro architecture, trains every
trainable parameter in one real step through the data pipeline; the registry and the protocol."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch

from tbps.objectives import OBJECTIVES, Objective, StepContext, build_objective

FUSION_MICRO = ["losses.fusion.width=32", "losses.fusion.heads=2"]


@dataclass
class Case:
    objective: str
    recipe: str  # read at the start of its last stage, where all of its losses are on
    overrides: list[str]  # on top of tests.conftest.MICRO
    losses: set[str]  # loss keys the step must return
    batch: set[str] = field(default_factory=set)  # keys the objective's batch hook / epoch hook add
    frozen: set[str] = field(default_factory=set)  # left untrained on purpose: requires_grad=False


CASES = {
    # The -cpu recipe with every TBPS-CLIP term on (MVS, SS, C-ITC) and the paper's frozen patch embedding.
    "tbps-clip": Case("tbps-clip", "tbps-clip-cpu",
                      ["model.conv_stem=null", "model.freeze_patch_embed=true", "data.augment.mvs=true",
                       "data.augment.ss_views=true",
                       "losses.mvs.enabled=true", "losses.ss.weight=0.4"],
                      {"nitc_loss", "ritc_loss", "citc_loss", "ss_loss"}, {"image_view2", "ss_view1", "ss_view2"},
                      frozen={"clip.visual.conv1.weight"}),
    "tbps-clip-cmmoco": Case("tbps-clip-cmmoco", "tbps-clip-cpu",
                             ["objective=tbps-clip-cmmoco", "losses.cmmoco.queue_size=16"],
                             {"nitc_loss", "ritc_loss", "citc_loss", "cmmoco_loss"}),
    "irra": Case("irra", "irra-cpu", FUSION_MICRO, {"sdm_loss", "id_loss", "mlm_loss"}, {"mlm_tokens", "mlm_labels"},
                 frozen={"clip.logit_scale", "objective.fusion.itm_head.weight", "objective.fusion.itm_head.bias"}),
    "laip": Case("laip", "laip-cpu", FUSION_MICRO + ["losses.itc.queue_size=16"],
                 {"itc_loss", "itm_loss", "triplet_loss", "bidiratt_loss", "mpm_loss"},
                 {"phrase_tokens", "mpm_tokens", "mpm_labels"}),
    # BidirAtt from the attention weights alone (no backward-attention term).
    "laip-forward": Case("laip", "laip-cpu", FUSION_MICRO + ["losses.itc.queue_size=16", "losses.bidiratt.mode=forward"],
                         {"itc_loss", "itm_loss", "triplet_loss", "bidiratt_loss", "mpm_loss"},
                         {"phrase_tokens", "mpm_tokens", "mpm_labels"}),
    "mefa": Case("mefa", "mefa-cpu", ["losses.imr_image.top_k=3", "losses.imr_text.weight=1",  # off in mefa-cpu
                                      "losses.imr_image.weight=1"],
                 {"nitc_loss", "ritc_loss", "imr_t_loss", "imc_t_loss", "imr_v_loss", "imc_v_loss", "cmr_loss",
                  "dcc_loss"}, {"neg_tokens", "neg_valid", "neg_image"}),
    # The hash-seeded word dictionary (no MiniLM load), and the alignment loss on (off in the CPU recipe).
    "textreid": Case("textreid", "textreid-cpu",
                     ["model.embed_dim=24", "model.text_tower.source=random", "model.text_tower.hidden=16",
                      "losses.cmmoco.queue_size=16", "losses.align.weight=1.0"],
                     {"cmmoco_loss", "id_loss", "align_loss"}, frozen={"clip.logit_scale"}),
}


def test_every_registered_objective_has_a_case():
    assert {c.objective for c in CASES.values()} == set(OBJECTIVES), "add the new objective to CASES"


def _built(case: Case, tiny_dataset):
    """Build the case's model, data set and objective and run the trainer's hooks in its order
    (prepare_data, configure, on_epoch_start, batch_hook) on ~12 pairs of many identities.
    Returns the model, the objective, the batch and a step context mid-epoch."""
    from tests.conftest import MICRO, objective_setup
    from tbps.recipes.config import load_recipe

    recipe = load_recipe(case.recipe, MICRO + case.overrides)
    assert recipe.objective == case.objective
    model, ds, obj, epoch, collate = objective_setup(recipe, tiny_dataset)
    batch = collate([ds[i] for i in range(0, len(ds), max(1, len(ds) // 12))])
    return model, obj, batch, StepContext(epoch=epoch + 0.5, total_epochs=epoch + 1, step=0)


def _one_step(case: Case, tiny_dataset):
    """:func:`_built`, then one forward and backward pass. Returns the model, the objective, the
    batch and the outputs."""
    model, obj, batch, ctx = _built(case, tiny_dataset)
    out = obj(model, batch, ctx)
    sum(v for k, v in out.items() if k.endswith("_loss")).backward()
    return model, obj, batch, out


def _reached(loss: torch.Tensor, params: list) -> list[bool]:
    """Per parameter: whether ``loss`` gives it a non-zero gradient."""
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return [g is not None and bool(g.abs().sum() > 0) for g in grads]


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_trainable_parameter_gets_a_gradient(case, tiny_dataset, monkeypatch, tmp_path):
    monkeypatch.setenv("TBPS_CACHE", str(tmp_path / "cache"))  # parsed phrases, caption rewrites, word vectors
    c = CASES[case]
    model, obj, batch, out = _one_step(c, tiny_dataset)
    assert c.batch <= set(batch), sorted(batch)
    assert c.losses <= set(out), sorted(out)
    assert all(torch.isfinite(v).all() for v in out.values())
    params = list(model.named_parameters()) + [(f"objective.{n}", p) for n, p in obj.named_parameters()]
    # Checked per tensor: an MLM head's vocabulary rows of ids absent from the batch get none by construction.
    missing = [n for n, p in params if p.requires_grad and (p.grad is None or not bool(p.grad.abs().sum() > 0))]
    assert missing == [], f"trainable parameters without gradient: {missing}"
    assert c.frozen <= {n for n, p in params if not p.requires_grad}
    assert all(p.grad is None for n, p in params if not p.requires_grad)
    if "neg_valid" in batch:
        assert batch["neg_valid"].any()  # some captions have rewrites


def test_momentum_copies_are_not_trained_and_keys_are_queued(tiny_dataset, monkeypatch, tmp_path):
    monkeypatch.setenv("TBPS_CACHE", str(tmp_path / "cache"))
    _, laip, batch, _ = _one_step(CASES["laip"], tiny_dataset)
    assert not any(p.requires_grad for p in laip.momentum.parameters())  # the EMA copy is never trained
    assert int((laip.image_queue.ids >= 0).sum()) == batch["pid"].shape[0]  # keys enqueued after the loss
    _, textreid, _, _ = _one_step(CASES["textreid"], tiny_dataset)
    assert not any(p.requires_grad for p in textreid.cmmoco.key_encoder.parameters())


def test_unknown_objective_names_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown objective 'nope'; known: \['irra', 'laip'"):
        build_objective("nope", None, {}, num_identities=1)


def test_hooks_default_to_no_ops_and_configure_is_required():
    class Bare(Objective):
        pass

    bare = Bare()
    assert bare.batch_hook(None) is None
    assert bare.prepare_data(None) is None and bare.after_step(None) is None
    assert bare.on_epoch_start(None, None, epoch=0, device="cpu") is None
    with pytest.raises(NotImplementedError, match="configure"):
        bare.configure({})
    with pytest.raises(NotImplementedError, match="forward"):
        bare(None, {}, StepContext(0.0, 1, 0))


def test_cmmoco_stage_rules_are_checked_on_configure():
    from tbps.models import ModelSpec, create_model
    from tbps.recipes.config import ConfigError

    torch.manual_seed(0)
    model = create_model(ModelSpec(arch="micro-vit"))
    off = build_objective("tbps-clip-cmmoco", model, {"cmmoco": {"weight": 0.0}}, num_identities=3)
    assert off.cmmoco is None
    with pytest.raises(ConfigError, match="cannot switch CM-MoCo on"):
        off.configure({"cmmoco": {"weight": 1.0}})
    on = build_objective("textreid", model, {"cmmoco": {"queue_size": 8}}, num_identities=3)
    on.configure({"cmmoco": {"queue_size": 8, "weight": 0.5}})  # re-weighting is fine
    assert on.cfg["cmmoco"]["weight"] == 0.5
    with pytest.raises(ConfigError, match="queue_size cannot change"):
        on.configure({"cmmoco": {"queue_size": 16}})
    with pytest.raises(ConfigError, match="queue_size 0"):
        build_objective("textreid", model, {"cmmoco": {"queue_size": 0}}, num_identities=3)


def test_bidiratt_trains_patch_and_phrase_features_not_the_attention(tiny_dataset, monkeypatch, tmp_path):
    """The BidirAtt weights are Grad-CAM's map, a constant pooling weight (losses.bidiratt.detach, default):
    the loss reaches the encoders (patch and phrase features) but not the fusion encoder; detach=false
    lets it reach the fusion encoder's attention (the earlier behaviour)."""
    monkeypatch.setenv("TBPS_CACHE", str(tmp_path / "cache"))
    model, obj, batch, ctx = _built(CASES["laip"], tiny_dataset)
    fusion, encoders = list(obj.fusion.parameters()), [p for p in model.parameters() if p.requires_grad]
    reached = {}
    for detach in (True, False):
        obj.cfg["bidiratt"]["detach"] = detach
        hit = _reached(obj(model, batch, ctx)["bidiratt_loss"], fusion + encoders)
        reached[detach] = (any(hit[:len(fusion)]), any(hit[len(fusion):]))
    assert reached[True] == (False, True)
    assert reached[False] == (True, True)


def test_cmr_detach_trains_the_refiner_alone(tiny_dataset, monkeypatch, tmp_path):
    """losses.cmr.detach (a stage that warms MeFa's refiner before its gradient reaches the encoders):
    the CMR loss reaches the refiner and nothing else; without it, the refiner, the encoders and the
    logit scale. The loss's value does not depend on the switch."""
    monkeypatch.setenv("TBPS_CACHE", str(tmp_path / "cache"))
    model, obj, batch, ctx = _built(CASES["mefa"], tiny_dataset)
    refiner, encoders = list(obj.refiner.parameters()), [p for p in model.parameters() if p.requires_grad]
    reached, values = {}, {}
    for detach in (True, False):
        obj.cfg["cmr"]["detach"] = detach
        loss = obj(model, batch, ctx)["cmr_loss"]
        hit = _reached(loss, refiner + encoders + [model.logit_scale])
        reached[detach] = (all(hit[:len(refiner)]), any(hit[len(refiner):-1]), hit[-1])
        values[detach] = loss.detach()
    assert reached[True] == (True, False, False)
    assert reached[False] == (True, True, True)
    assert torch.equal(values[True], values[False])
