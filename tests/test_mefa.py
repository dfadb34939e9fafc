"""MeFa: losses against hand computations, CMR against a loop over eqs. 3-5, clue selection,
image hard negatives and training through the real trainer (gradients: tests/test_objectives.py)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tbps.losses import ditc_loss, imc_loss, imr_loss
from tbps.models.refine import CrossModalRefiner, select_clue_words


def _unit(*v):
    return F.normalize(torch.tensor(v, dtype=torch.float32), dim=-1)


# ---------------------------------------------------------------------- losses
def test_imr_loss_by_hand():
    a = _unit(1.0, 0.0)[None]
    p = _unit(0.6, 0.8)[None]  # cos(a, p) = 0.6
    negs = torch.stack([_unit(0.8, 0.6), _unit(0.0, 1.0)])[None]  # cos 0.8 and 0.0
    both = torch.tensor([[True, True]])
    # hinge: 0.2 - 0.6 + 0.8 = 0.4 and max(0, 0.2 - 0.6 + 0) = 0 -> mean 0.2
    assert imr_loss(a, p, negs, both, 0.2).item() == pytest.approx(0.2, abs=1e-6)
    assert imr_loss(a, p, negs, torch.tensor([[True, False]]), 0.2).item() == pytest.approx(0.4, abs=1e-6)
    assert imr_loss(a, p, negs, torch.tensor([[False, False]]), 0.2).item() == 0.0


def test_imc_loss_by_hand_uses_the_hardest_valid_negative():
    a = torch.stack([_unit(1.0, 0.0), _unit(0.0, 1.0)])
    p = torch.stack([_unit(0.6, 0.8), _unit(0.0, 1.0)])  # cos 0.6 and 1.0
    negs = torch.stack([torch.stack([_unit(0.8, 0.6), _unit(0.0, 1.0)]),
                        torch.stack([_unit(1.0, 0.0), _unit(0.6, 0.8)])])
    valid = torch.tensor([[True, True], [False, True]])
    # row 0: hardest cos 0.8 -> softplus(10 (0.8 - 0.6)); row 1: only the second, cos 0.8 -> softplus(10 (0.8 - 1))
    want = (math.log1p(math.exp(2.0)) + math.log1p(math.exp(-2.0))) / 2
    assert imc_loss(a, p, negs, valid, 10.0).item() == pytest.approx(want, rel=1e-5)
    # a row without negatives is left out, not counted as zero
    only0 = torch.tensor([[True, True], [False, False]])
    assert imc_loss(a, p, negs, only0, 10.0).item() == pytest.approx(math.log1p(math.exp(2.0)), rel=1e-5)


def test_ditc_loss_by_hand():
    clue = torch.stack([_unit(1.0, 0.0), _unit(0.0, 1.0), _unit(1.0, 1.0)])
    img = torch.stack([_unit(1.0, 0.2), _unit(0.1, 1.0), _unit(-1.0, 0.3)])
    pid = torch.tensor([0, 1, 0])
    s = 5.0
    want = 0.0
    for q_feats, k_feats in ((clue, img), (img, clue)):
        rows = []
        for i in range(3):
            logits = [s * float(q_feats[i] @ k_feats[j]) for j in range(3)]
            lse = math.log(sum(math.exp(x) for x in logits))
            pos = [j for j in range(3) if pid[j] == pid[i]]
            rows.append(-sum(logits[j] - lse for j in pos) / len(pos))
        want += 0.5 * sum(rows) / 3
    assert ditc_loss(clue, img, clue, img, pid, pid, s).item() == pytest.approx(want, rel=1e-5)


# ------------------------------------------------------------------------- CMR
def test_refiner_matches_a_loop_over_the_equations():
    torch.manual_seed(0)
    ref = CrossModalRefiner(4, temperature=0.5, token_scale="count")
    b, n, m = 2, 3, 5
    v, t = torch.randn(b, n, 4), torch.randn(b, m, 4)
    gv, gt = torch.randn(b, 4), torch.randn(b, 4)
    mask = torch.tensor([[True] * 5, [True, True, True, False, False]])
    r_v, r_t = ref(v, gv, t, mask, gt)
    W, bias = ref.gate.weight, ref.gate.bias
    for k in range(b):
        words = [j for j in range(m) if mask[k, j]]
        a = [[math.exp(F.cosine_similarity(v[k, i], t[k, j], dim=0).item() / 0.5) for j in words] for i in range(n)]
        z = sum(map(sum, a))
        vw = [n * sum(a[i]) / z for i in range(n)]  # eq. 3, scaled by N
        tw = [len(words) * sum(a[i][jj] for i in range(n)) / z for jj in range(len(words))]

        def gated(x, g):  # eqs. 4-5
            u = torch.cat([x, g])
            return u * torch.tanh(W @ u + bias)

        pv = sum(gated(vw[i] * v[k, i], gv[k]) for i in range(n)) / n
        pt = sum(gated(tw[jj] * t[k, j], gt[k]) for jj, j in enumerate(words)) / len(words)
        assert torch.allclose(r_v[k], ref.out(pv), atol=1e-5)
        assert torch.allclose(r_t[k], ref.out(pt), atol=1e-5)


def test_refiner_weights_ignore_padding_and_follow_eq_3():
    torch.manual_seed(1)
    v, t = torch.randn(1, 4, 8), torch.randn(1, 6, 8)
    mask = torch.tensor([[True, True, True, True, False, False]])
    w_v, w_t = CrossModalRefiner(8, token_scale="count").weights(v, t, mask)
    assert w_v.mean().item() == pytest.approx(1.0, abs=1e-5)
    assert w_t[0, :4].mean().item() == pytest.approx(1.0, abs=1e-5)
    assert (w_t[0, 4:] == 0).all()
    # Eq. 3 as printed (the default): one normalisation by the double sum, the patch weights sum to 1.
    w_v, w_t = CrossModalRefiner(8).weights(v, t, mask)
    assert w_v.sum().item() == pytest.approx(1.0, abs=1e-6) and w_t.sum().item() == pytest.approx(1.0, abs=1e-6)
    # By hand for one patch and two words with cosines 1 and 0: w_v = 1, w_t = (e, 1) / (e + 1).
    v1, t2 = torch.tensor([[[1.0, 0.0]]]), torch.tensor([[[2.0, 0.0], [0.0, 3.0]]])
    w_v, w_t = CrossModalRefiner(2).weights(v1, t2, torch.tensor([[True, True]]))
    torch.testing.assert_close(w_v, torch.tensor([[1.0]]))
    torch.testing.assert_close(w_t, torch.tensor([[math.e, 1.0]]) / (math.e + 1))


# ------------------------------------------------------------------------- DCC
def test_clue_words_are_the_secondary_ones():
    sims = torch.tensor([[0.3, 0.9, 0.0, 0.6, 0.8, 0.1, 0.5, 0.7, 0.2, 0.4, -5.0, -5.0]])
    mask = torch.tensor([[True] * 10 + [False, False]])  # two padding slots, lowest similarity of all
    chosen = select_clue_words(sims, mask, skip_top=3, words=4, skip_bottom=3)
    # ranked: .9 .8 .7 | .6 .5 .4 .3 | .2 .1 .0 -> the middle four; padding never chosen
    assert sorted(sims[chosen].tolist()) == pytest.approx([0.3, 0.4, 0.5, 0.6])
    # the window is cut by the bottom: 7 words (.9 .8 .6 | .5 | .3 .1 .0), skip 3 + 3 -> only rank 3
    m7 = torch.tensor([[True] * 7 + [False] * 5])
    assert sims[select_clue_words(sims, m7, 3, 4, 3)].tolist() == pytest.approx([0.5])
    # too short for any window: still one word, never a padding slot
    m2 = torch.tensor([[True, True] + [False] * 10])
    c2 = select_clue_words(sims, m2, 3, 4, 3)
    assert c2.sum() == 1 and c2[0, :2].any()


# ------------------------------------------------------------- image negatives
def test_image_negatives_are_other_people_and_the_most_similar():
    from tbps.data.negatives.image import hard_negative_images

    torch.manual_seed(0)
    feats = F.normalize(torch.randn(40, 6), dim=-1)
    pids = torch.arange(40) // 4
    nb = hard_negative_images(feats, pids, k=5, chunk=7)
    assert nb.shape == (40, 5)
    assert not (pids[nb] == pids[:, None]).any()
    sim = feats @ feats.t()
    for i in range(40):
        others = [j for j in range(40) if pids[j] != pids[i]]
        want = sorted(others, key=lambda j: -sim[i, j].item())[:5]
        assert nb[i].tolist() == want
    assert torch.equal(nb, hard_negative_images(feats, pids, k=5, chunk=4096))
    # k larger than the other people's images: capped
    assert hard_negative_images(feats[:8], pids[:8], k=50).shape == (8, 4)


def test_dataset_items_carry_a_negative_image_of_another_person(tiny_dataset):
    from tbps.data.dataset import TrainPairs
    from tbps.data.layouts import load_annotations
    from tbps.models import CLIP_MEAN, CLIP_STD

    recs = load_annotations(tiny_dataset).split("train")
    ds = TrainPairs(recs, (32, 16), mean=CLIP_MEAN, std=CLIP_STD, augment=None, text_augment=None)
    ds.cache_images()
    pidx = torch.tensor([ds.pid_index[r.pid] for r in recs])
    from tbps.data.negatives.image import hard_negative_images

    ds.negatives = hard_negative_images(F.normalize(torch.randn(len(recs), 4), dim=-1), pidx, k=3)
    from torchvision.transforms.functional import normalize

    plain = [normalize(ds.cache[j].float() / 255, CLIP_MEAN, CLIP_STD) for j in range(len(recs))]  # no augmentation
    for i in range(0, len(ds), 5):
        item = ds[i]
        ri = ds.items[i][0]
        match = [j for j in ds.negatives[ri].tolist()
                 if torch.allclose(item["neg_image"], plain[j])]
        assert match and all(pidx[j] != pidx[ri] for j in match)
        assert torch.equal(item["neg_image"], ds[i]["neg_image"])  # seeded per sample


# ------------------------------------------------- the objective in the trainer
def _micro(extra=()):
    from tests.conftest import MICRO
    from tbps.recipes.config import load_recipe

    # the image bank is IMR(V)'s, which mefa-cpu ships off
    return load_recipe("mefa-cpu", MICRO + ["losses.imr_image.weight=1", "losses.imr_image.top_k=3", *extra])


def test_trains_refreshes_the_bank_each_epoch_and_resumes_exactly(tiny_dataset, tmp_path):
    from tbps.models.checkpoint import load_checkpoint
    from tbps.engine.train import TrainJob, train

    def job(out, **kw):  # the image bank is what must survive the resume; text rewrites are seeded per epoch
        return TrainJob(data_root=str(tiny_dataset), recipe=_micro(["losses.imr_text.weight=0"]),
                        out_dir=str(tmp_path / out), progress=False, **kw)

    s = train(job("a", epochs=2))
    assert s["finished"]
    ck = load_checkpoint(tmp_path / "a" / "last.pt")
    extra = ck["objective"]["_extra_state"]
    assert extra["bank_epoch"] == 1  # rebuilt at the start of the second epoch
    train(job("b", epochs=2, stop_after_epochs=1))
    train(job("b", resume=True))
    a = load_checkpoint(tmp_path / "a" / "last.pt")["model"]
    b = load_checkpoint(tmp_path / "b" / "last.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------- recipes
def test_paper_recipe_settings():
    from tbps.recipes.config import load_recipe

    r = load_recipe("mefa")
    assert (r.model.arch, r.model.pretrained) == ("EVA02-B-16", "merged2b_s8b_b131k")
    assert tuple(r.model.image_size) == (224, 224) and r.model.context_length == 77
    assert (r.train.epochs, r.optim.name, r.optim.lr, r.optim.warmup_start_lr) == (12, "lamb", 1e-5, 1e-6)
    assert r.losses["imr_text"]["tiers"] == [1, 2, 3]


def test_lamb_optimiser_steps():
    from tbps.recipes.config import OptimConfig
    from tbps.engine.optim import build_optimizer

    lin = torch.nn.Linear(4, 2)
    opt = build_optimizer({"model": lin}, OptimConfig(name="lamb", lr=1e-2))
    assert type(opt).__name__ == "Lamb"
    before = lin.weight.detach().clone()
    lin(torch.randn(3, 4)).pow(2).sum().backward()
    opt.step()
    assert not torch.equal(before, lin.weight)


@pytest.mark.slow
def test_eva02_backbone_gives_token_outputs():
    """The paper's backbone, built without weights (none offline): global and token features."""
    from tbps.models.factory import ModelSpec, create_model

    model = create_model(ModelSpec(arch="EVA02-B-16", pretrained=None, image_size=(224, 224)))
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        g, patches = model.image_tokens(x)
        g_enc = model.encode_image(x)
        tg, words, mask = model.text_tokens(torch.tensor([[49406, 320, 1611, 49407] + [0] * 73]))
    assert g.shape == (1, 512) and patches.shape == (1, 196, 512)
    assert tg.shape == (1, 512) and words.shape == (1, 77, 512) and mask.sum() == 4
    assert torch.allclose(g, g_enc, atol=1e-5)  # the token path pools to the same global feature
