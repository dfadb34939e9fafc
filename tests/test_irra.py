"""IRRA: MLM masking, SDM against a naive reference, what it leaves untrained, an end-to-end run."""

from __future__ import annotations

import math

import torch

from tbps.data.masking import IGNORE, MaskSpec, mlm_mask
from tbps.losses.sdm import sdm_loss

SPEC = MaskSpec()


def _tokens(b=400, l=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    toks = torch.zeros(b, l, dtype=torch.long)
    lengths = torch.randint(3, l - 2, (b,), generator=g)
    for i, n in enumerate(lengths.tolist()):
        toks[i, 0] = 49406
        toks[i, 1 : n + 1] = torch.randint(1, 49000, (n,), generator=g)
        toks[i, n + 1] = 49407
    return toks


def test_mlm_mask_never_touches_padding_or_specials_and_follows_80_10_10():
    toks = _tokens()
    inputs, labels = mlm_mask(toks, SPEC, 0.15, torch.Generator().manual_seed(3))
    special = torch.isin(toks, torch.tensor([0, 49406, 49407]))
    assert torch.equal(inputs[special], toks[special])  # specials and padding unchanged
    assert bool((labels[special] == IGNORE).all())
    chosen = labels != IGNORE
    assert torch.equal(labels[chosen], toks[chosen])
    assert torch.equal(inputs[~chosen], toks[~chosen])
    rate = chosen.sum().item() / (~special).sum().item()
    assert 0.13 < rate < 0.18, rate  # 15% (plus one forced pick in rows that drew none)
    n = chosen.sum().item()
    masked = (inputs[chosen] == SPEC.mask_id).sum().item() / n
    kept = (inputs[chosen] == toks[chosen]).sum().item() / n
    assert abs(masked - 0.8) < 0.04 and abs(kept - 0.1) < 0.03, (masked, kept)
    replaced = inputs[chosen & (inputs != SPEC.mask_id) & (inputs != toks)]
    assert bool(((replaced > 0) & (replaced < SPEC.mask_id)).all())  # random ids are ordinary BPE ids
    assert bool(chosen.any(dim=1).all())  # every caption contributes


def test_sdm_against_naive_reference():
    torch.manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(6, 5), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(6, 5), dim=-1)
    pid = torch.tensor([0, 0, 1, 2, 2, 2])
    loss = sdm_loss(img, txt, img, txt, pid, pid, 50.0)
    ref = 0.0
    for a, b in ((img, txt), (txt, img)):
        for i in range(6):
            s = [50.0 * float(a[i] @ b[j]) for j in range(6)]
            m = max(s)
            z = sum(math.exp(x - m) for x in s)
            p = [math.exp(x - m) / z for x in s]
            npos = sum(int(pid[i] == pid[j]) for j in range(6))
            q = [int(pid[i] == pid[j]) / npos for j in range(6)]
            ref += sum(p[j] * (math.log(p[j]) - math.log(q[j] + 1e-8)) for j in range(6)) / 6
    assert abs(loss.item() - ref) < 1e-4 * max(1.0, ref)


def _micro_irra(num_ids=4):
    from tbps.recipes.config import load_recipe
    from tbps.models import create_model
    from tbps.objectives import build_objective

    r = load_recipe("irra-cpu", ["model.arch=micro-vit", "model.image_size=[32, 16]", "model.context_length=32",
                                 "losses.fusion.width=32", "losses.fusion.heads=2"])
    torch.manual_seed(0)
    m = create_model(r.model)
    return m, build_objective("irra", m, r.losses, num_identities=num_ids)


def test_irra_trains_no_logit_scale_and_no_itm_head():
    """IRRA's losses use a fixed scale (50) and no ITM: exactly those are marked untrained (every
    other parameter gets a gradient: tests/test_objectives.py)."""
    m, obj = _micro_irra()
    params = list(m.named_parameters()) + [(f"objective.{n}", p) for n, p in obj.named_parameters()]
    assert sorted(n for n, p in params if not p.requires_grad) == [
        "clip.logit_scale", "objective.fusion.itm_head.bias", "objective.fusion.itm_head.weight"]


def test_irra_trains_end_to_end_and_refuses_to_rescore(tiny_dataset, micro_overrides, tmp_path, capsys):
    from tbps.cli.main import main
    from tbps.recipes.config import load_recipe
    from tbps.engine.train import TrainJob, train

    r = load_recipe("irra-cpu", micro_overrides + ["losses.fusion.width=32", "losses.fusion.heads=2"])
    res = train(TrainJob(str(tiny_dataset), r, str(tmp_path / "run"), epochs=1, progress=False))
    assert res["finished"] and res["global_step"] > 0
    ck = torch.load(res["last"], weights_only=False)
    assert any(k.startswith("fusion.") for k in ck["objective"]) and "classifier.weight" in ck["objective"]
    # IRRA never trains the ITM head: re-scoring with it is refused with a user error.
    assert main(["eval", res["last"], "--data", str(tiny_dataset), "--rescore", "4", "--json"]) == 2
    assert "ITM head is untrained" in capsys.readouterr().err


def test_mlm_over_the_training_vocabulary_is_the_full_softmax_restricted_to_it():
    """``mlm.vocabulary: training``: the support is exactly the training captions' word tokens, the
    logits are the full head's columns for them, and the loss is the cross-entropy of the full logits
    renormalised over those columns."""
    from pathlib import Path

    import pytest

    from tbps.data.dataset import TrainPairs
    from tbps.data.records import Record
    from tbps.data.text import clean_caption
    from tbps.models import get_tokenizer
    from tbps.models.fusion import FusionOutput
    from tbps.recipes.config import ConfigError, load_recipe
    from tbps.models import create_model
    from tbps.objectives import build_objective

    r = load_recipe("irra-cpu", ["model.arch=micro-vit", "model.image_size=[32, 16]", "model.context_length=32",
                                 "losses.fusion.width=32", "losses.fusion.heads=2", "losses.mlm.vocabulary=training"])
    torch.manual_seed(0)
    m = create_model(r.model)
    obj = build_objective("irra", m, r.losses, num_identities=3)
    labels = torch.tensor([320, 1929, 320])
    with pytest.raises(ValueError, match="needs the training captions first"):
        obj._mlm_targets(labels)
    captions = ["A man in a RED coat.", "a woman with a black backpack", "a man in a red coat"]
    records = [Record(Path(f"/none/{i}.jpg"), tuple(cs), i, "train") for i, cs in enumerate((captions[:2], captions[2:]))]
    obj.prepare_data(TrainPairs(records, (32, 16), mean=(0.5,) * 3, std=(0.5,) * 3, max_words=60))
    tok = get_tokenizer(m.spec)
    words = tok([clean_caption(c, 60) for c in captions])
    expected = sorted({int(t) for t in words.flatten()} - {0, 49405, 49406, 49407})
    assert obj._support is None  # found when first needed
    obj._mlm_targets(labels)
    assert obj._support.tolist() == expected
    hidden = torch.randn(2, 6, 32)
    positions = torch.zeros(2, 6, dtype=torch.bool)
    positions[0, 1] = positions[1, 2] = positions[1, 4] = True
    out = FusionOutput(hidden, [])
    full = obj.fusion.mlm_logits(out, positions)  # (3, 49408)
    chosen_ids = torch.tensor([expected[0], expected[-1], 49000])  # the last is no training caption's token
    support, remapped = obj._mlm_targets(chosen_ids)
    assert remapped.tolist() == [0, len(expected) - 1, -100]
    part = obj.fusion.mlm_logits(out, positions, support)
    assert torch.allclose(part, full[:, support], atol=1e-5)
    ce = torch.nn.functional.cross_entropy(part[:2], remapped[:2])
    ref = -torch.log_softmax(full[:2, support], dim=1)[torch.arange(2), remapped[:2]].mean()
    assert abs(ce.item() - ref.item()) < 1e-5
    with pytest.raises(ConfigError, match="losses.mlm.vocabulary 'some': all or training"):
        obj.configure({"mlm": {"vocabulary": "some"}})


def test_irra_with_the_training_vocabulary_trains_end_to_end(tiny_dataset, micro_overrides, tmp_path, monkeypatch):
    """The trainer calls prepare_data before the first step (else the MLM loss refuses to run), and every
    step's MLM loss is over the training captions' tokens: below log(S), far below log(49,408)."""
    from tbps.engine.train import TrainJob, train
    from tbps.objectives.irra import IRRAObjective
    from tbps.recipes.config import load_recipe

    seen = []
    forward = IRRAObjective.forward

    def spy(self, model, batch, ctx):
        out = forward(self, model, batch, ctx)
        seen.append((len(self._support), float(out["mlm_loss"])))
        return out

    monkeypatch.setattr(IRRAObjective, "forward", spy)
    r = load_recipe("irra-cpu", micro_overrides + ["losses.fusion.width=32", "losses.fusion.heads=2", "stages=[]",
                                                   "losses.mlm.vocabulary=training"])
    res = train(TrainJob(str(tiny_dataset), r, str(tmp_path / "run"), epochs=1, progress=False))
    assert res["finished"] and len(seen) == res["global_step"] > 0
    support = seen[0][0]
    assert 10 < support < 1000 and all(n == support for n, _ in seen)
    assert all(0 < loss < math.log(support) + 1.0 for _, loss in seen), seen


def test_mlm_on_the_first_k_captions_is_mlm_on_those_rows_alone():
    """``mlm.samples=k``: the hook masks the batch's first k captions only (all of a smaller batch), and
    the MLM loss of the whole batch equals the loss IRRA's MLM (every caption) gives on a batch of those k
    rows with the same masks: the other rows take no part. A negative count is refused in one line."""
    import pytest

    from tbps.models import get_tokenizer
    from tbps.objectives import StepContext
    from tbps.recipes.config import ConfigError

    ctx = StepContext(epoch=0.0, total_epochs=1, step=0)
    m, obj = _micro_irra()
    m.eval()  # no dropout: the k rows' features do not depend on the rest of the batch
    obj.configure({"mlm": {"samples": 3}})
    tok = get_tokenizer(m.spec)
    caps = ["a man in a red coat", "a woman with a black backpack", "grey shoes and a hat", "long hair",
            "blue jeans and a white shirt", "a skirt"]
    g = torch.Generator().manual_seed(0)
    batch = {"image": torch.randn(6, 3, 32, 16, generator=g), "tokens": tok(caps), "pid": torch.tensor([0, 0, 1, 2, 3, 3]),
             "captions": caps}
    batch = obj.batch_hook(None)(batch, tok)
    assert batch["mlm_tokens"].shape == (3, batch["tokens"].shape[1])
    assert ((batch["mlm_labels"] != -100) | (batch["mlm_tokens"] == batch["tokens"][:3])).all()
    out = obj(m, batch, ctx)
    obj.configure({"mlm": {"samples": 0}})
    rows = {k: v[:3] for k, v in batch.items() if k in ("image", "tokens", "pid", "mlm_tokens", "mlm_labels")}
    ref = obj(m, rows, ctx)
    assert torch.allclose(out["mlm_loss"], ref["mlm_loss"], atol=1e-6)
    assert not torch.allclose(out["sdm_loss"], ref["sdm_loss"])  # the other losses still see all six rows
    obj.configure({"mlm": {"samples": 10}})
    small = obj.batch_hook(None)({k: batch[k] for k in ("image", "tokens", "pid", "captions")}, tok)
    assert small["mlm_tokens"].shape[0] == 6  # a batch smaller than k: every caption
    with pytest.raises(ConfigError, match=r"losses.mlm.samples -1: 0 \(every caption\) or a count > 0"):
        obj.configure({"mlm": {"samples": -1}})
