"""Where tbps follows the reference code (TBPS-CLIP, IRRA, TextReID) by default or as a named option:
each check computes the reference's formula by hand on small tensors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn


def _ce_smooth(logits, y, e):
    """CrossEntropyLabelSmooth of TextReID's code: targets (1 - e) onehot + e / P, mean over the batch."""
    p = logits.shape[1]
    t = torch.full_like(logits, e / p)
    t[torch.arange(len(y)), y] += 1 - e
    return -(t * torch.log_softmax(logits, 1)).sum(1).mean()


def test_textreid_id_loss_is_summed_over_unit_class_vectors_and_irra_halves_it():
    from tbps.losses.id_loss import NormalizedClassifier, id_loss

    torch.manual_seed(0)
    clf = NormalizedClassifier(6, 5)
    assert [n for n, _ in clf.named_parameters()] == ["weight"]  # no bias
    bound = math.sqrt(6 / (6 + 5))  # Xavier-uniform, gain 1
    assert clf.weight.abs().max() <= bound and clf.weight.std() > 0.3 * bound
    with torch.no_grad():
        clf.weight.mul_(torch.arange(1.0, 6.0)[:, None])  # class vectors of different lengths: normalising matters
    v, t, y = torch.randn(4, 6) * 3, torch.randn(4, 6) * 3, torch.tensor([0, 3, 3, 1])
    proj = clf.weight / clf.weight.norm(dim=1, keepdim=True)  # TextReID: F.normalize(projection, dim=0), (D, P)
    want = _ce_smooth(v @ proj.t(), y, 0.1) + _ce_smooth(t @ proj.t(), y, 0.1)
    assert torch.allclose(id_loss(clf, v, t, y, 0.1, reduction="sum"), want, atol=1e-6)
    lin = nn.Linear(6, 5)  # IRRA: (CE(img) + CE(txt)) / 2 with a biased linear layer, no smoothing
    want_irra = (F.cross_entropy(lin(v), y) + F.cross_entropy(lin(t), y)) / 2
    assert torch.allclose(id_loss(lin, v, t, y, 0.0), want_irra, atol=1e-6)
    with pytest.raises(ValueError):
        id_loss(lin, v, t, y, 0.0, reduction="none")


def test_textreid_objective_uses_the_sum_and_irra_the_mean():
    from tbps.objectives import StepContext, build_objective

    class Feats(nn.Module):  # a stand-in model: fixed features, so the ID term is checked alone
        embed_dim = 8
        logit_scale = nn.Parameter(torch.tensor(1.0))

        def __init__(self, img, txt):
            super().__init__()
            self.img, self.txt = img, txt

        def encode_image(self, x):
            return self.img

        def encode_text(self, x):
            return self.txt

    torch.manual_seed(1)
    img, txt, pid = torch.randn(4, 8), torch.randn(4, 8), torch.tensor([0, 1, 1, 2])
    model = Feats(img, txt)
    obj = build_objective("textreid", model, {"cmmoco": {"weight": 0.0}, "align": {"weight": 0.0}}, num_identities=3)
    out = obj(model, {"image": None, "tokens": None, "pid": pid}, StepContext(0.0, 1.0, 0))
    w = F.normalize(obj.classifier.weight, dim=1)
    assert torch.allclose(out["id_loss"], _ce_smooth(img @ w.t(), pid, 0.1) + _ce_smooth(txt @ w.t(), pid, 0.1))
    old = build_objective("textreid", model, {"cmmoco": {"weight": 0.0}, "align": {"weight": 0.0},
                                              "id": {"reduction": "mean", "classifier": "linear"}}, num_identities=3)
    out = old(model, {"image": None, "tokens": None, "pid": pid}, StepContext(0.0, 1.0, 0))
    c = old.classifier
    assert isinstance(c, nn.Linear) and c.bias is not None
    assert torch.allclose(out["id_loss"], (_ce_smooth(c(img), pid, 0.1) + _ce_smooth(c(txt), pid, 0.1)) / 2)


def test_key_encoder_in_train_mode_uses_batch_statistics():
    from tbps.models.momentum import MomentumEncoder

    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    with torch.no_grad():
        net[1].running_mean.fill_(5.0)  # far from the batch's statistics
    net.train()
    x = torch.randn(6, 3)
    h = net[0](x).detach()
    batch_norm = (h - h.mean(0)) / torch.sqrt(h.var(0, unbiased=False) + 1e-5)  # BN with batch statistics
    running = (h - 5.0) / math.sqrt(1 + 1e-5)  # BN with the copied running statistics
    key_train, key_eval = MomentumEncoder(net, train_mode=True), MomentumEncoder(net)
    key_train.train(), key_eval.train()  # the objective trains: the parent module is in train mode
    assert key_train.module.training and not key_eval.module.training
    assert torch.allclose(key_train(x), batch_norm, atol=1e-5)
    assert torch.allclose(key_eval(x), running, atol=1e-5)
    key_train.eval()
    assert not key_train.module.training  # evaluation: both copies in eval mode


def test_nitc_soft_targets_from_a_second_pass():
    from tbps.losses.common import identity_targets
    from tbps.losses.nitc import nitc_loss

    torch.manual_seed(2)
    img, txt = F.normalize(torch.randn(4, 5), dim=1), F.normalize(torch.randn(4, 5), dim=1)
    img_s, txt_s = F.normalize(img + 0.3 * torch.randn(4, 5), dim=1), F.normalize(txt + 0.3 * torch.randn(4, 5), dim=1)
    pid, scale, a = torch.tensor([0, 0, 1, 2]), torch.tensor(20.0), 0.4
    q = identity_targets(pid, pid)

    def ref(s, s_soft):  # TBPS-CLIP's calc_contrastive: targets from the no-grad pass
        t = a * F.softmax(s_soft, 1) + (1 - a) * q
        return -(F.log_softmax(s, 1) * t).sum(1).mean()

    want = 0.5 * (ref(scale * img @ txt.t(), scale * img_s @ txt_s.t()) + ref(scale * txt @ img.t(), scale * txt_s @ img_s.t()))
    got = nitc_loss(img, txt, img, txt, pid, pid, scale, a, soft_i2t=scale * img_s @ txt_s.t(),
                    soft_t2i=scale * txt_s @ img_s.t())
    assert torch.allclose(got, want, atol=1e-6)
    same = 0.5 * (ref(scale * img @ txt.t(), scale * img @ txt.t()) + ref(scale * txt @ img.t(), scale * txt @ img.t()))
    assert torch.allclose(nitc_loss(img, txt, img, txt, pid, pid, scale, a), same, atol=1e-6)
    assert not torch.allclose(got, same)


def test_tbps_clip_second_pass_reruns_the_encoders_in_train_mode():
    from tbps.objectives import StepContext, build_objective

    class Drop(nn.Module):  # dropout model: a second pass differs from the first unless the RNG is replayed
        embed_dim = 6

        def __init__(self):
            super().__init__()
            self.img, self.txt = nn.Linear(6, 6), nn.Linear(6, 6)
            self.drop = nn.Dropout(0.5)
            self.logit_scale = nn.Parameter(torch.tensor(math.log(10.0)))
            self.calls = 0

        def encode_image(self, x):
            self.calls += 1
            return self.img(self.drop(x))

        def encode_text(self, x):
            self.calls += 1
            return self.txt(self.drop(x))

        def scale(self):
            return self.logit_scale.exp()

    torch.manual_seed(3)
    model = Drop().train()
    batch = {"image": torch.randn(4, 6), "tokens": torch.randn(4, 6), "pid": torch.tensor([0, 1, 2, 2])}
    losses = {"ritc": {"weight": 0.0}, "nitc": {"soft_targets": "second_pass", "ramp_epochs": 0.0}}
    obj = build_objective("tbps-clip", model, losses, num_identities=3)
    torch.manual_seed(4)
    got = obj(model, batch, StepContext(1.0, 2.0, 0))["nitc_loss"]
    assert model.calls == 4  # two encoders x two passes
    # By hand, replaying the same RNG draws in the same order: graph pass (image, text), then the no-grad pass.
    from tbps.losses.nitc import nitc_loss

    torch.manual_seed(4)
    i1, t1 = F.normalize(model.encode_image(batch["image"]), dim=1), F.normalize(model.encode_text(batch["tokens"]), dim=1)
    with torch.no_grad():
        t2, i2 = F.normalize(model.encode_text(batch["tokens"]), dim=1), F.normalize(model.encode_image(batch["image"]), dim=1)
    s = model.scale().detach()
    want = nitc_loss(i1, t1, i1, t1, batch["pid"], batch["pid"], s, 0.5, soft_i2t=s * i2 @ t2.t(), soft_t2i=s * t2 @ i2.t())
    assert torch.allclose(got, want, atol=1e-6)
    same = build_objective("tbps-clip", model, {**losses, "nitc": {"ramp_epochs": 0.0}}, num_identities=3)
    model.calls = 0
    torch.manual_seed(4)
    assert not torch.allclose(same(model, batch, StepContext(1.0, 2.0, 0))["nitc_loss"], got)
    assert model.calls == 2


def test_logit_scale_capped_in_the_forward_as_tbps_clip_does():
    from tbps.models.factory import create_model
    from tbps.models.spec import ModelSpec

    model = create_model(ModelSpec(arch="micro-vit", image_size=(32, 16), context_length=32))
    with torch.no_grad():
        model.logit_scale.fill_(5.0)  # exp(5) = 148 > 100
    p = nn.Parameter(torch.tensor(5.0))  # TBPS-CLIP: logit_scale.data = clamp(logit_scale.exp().data, max=100)
    ref = p.exp()
    ref.data = torch.clamp(ref.data, max=100)
    (3 * ref).backward()
    model.logit_scale_cap = 100.0
    s = model.scale()
    (3 * s).backward()
    assert float(s.detach()) == pytest.approx(100.0) and float(ref.detach()) == pytest.approx(100.0)
    assert float(model.logit_scale.grad) == pytest.approx(float(p.grad), rel=1e-6)  # 3 exp(5): as if uncapped
    model.logit_scale_cap = None
    assert float(model.scale()) == pytest.approx(math.exp(5.0), rel=1e-6)


def test_irra_id_classifier_runs_in_low_precision_under_autocast():
    """IRRA's classifier runs in fp16; tbps's under AMP does too (autocast), and the loss is fp32."""
    from tbps.losses.id_loss import id_loss

    lin = nn.Linear(8, 3)
    v, t, y = torch.randn(4, 8), torch.randn(4, 8), torch.tensor([0, 1, 2, 0])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert lin(v.float()).dtype == torch.bfloat16
        loss = id_loss(lin, v.float(), t.float(), y, 0.0)
    assert loss.dtype == torch.float32
    half = lambda x: (x.bfloat16() @ lin.weight.bfloat16().t() + lin.bias.bfloat16()).float()  # noqa: E731
    assert torch.allclose(loss, (F.cross_entropy(half(v), y) + F.cross_entropy(half(t), y)) / 2, atol=1e-2)


def test_irra_optimiser_groups_and_per_epoch_schedule():
    from tbps.engine.optim import lr_at, param_groups
    from tbps.recipes.config import load_recipe

    cfg = load_recipe("irra").optim
    assert cfg.eps == 1e-3 and cfg.bias_lr_factor == 2.0 and cfg.schedule_unit == "epoch"
    net = nn.ModuleDict({"enc": nn.Linear(2, 2)})
    head = nn.Linear(2, 2)
    groups = param_groups({"model": net, "objective": head}, cfg)
    factor = {id(p): g["lr_factor"] for g in groups for p in g["params"]}
    decay = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    assert factor[id(net.enc.weight)] == 1.0 and factor[id(head.weight)] == 5.0
    assert factor[id(net.enc.bias)] == 2.0 and factor[id(head.bias)] == 2.0 and decay[id(net.enc.bias)] == 0.0

    def irra(e):  # IRRA's LRSchedulerWithWarmup (linear warm-up factor 0.1 over 5 epochs, cosine to 0 at 60)
        if e < 5:
            return 1e-5 * (0.1 * (1 - e / 5) + e / 5)
        return 0.5 * 1e-5 * (1 + math.cos(math.pi * (e - 5) / 55))

    for pos in (0.0, 0.7, 3.2, 5.0, 17.9, 59.99):
        assert lr_at(pos, 60, cfg) == pytest.approx(irra(math.floor(pos)), rel=1e-9)


def test_clip_resnet_takes_a_non_square_input_and_textreid_last_stride():
    from open_clip.modified_resnet import ModifiedResNet

    from tbps.models.resnet import adapt_modified_resnet, resize_attnpool_embedding

    pos = torch.randn(1 + 3 * 3, 4)
    out = resize_attnpool_embedding(pos, (6, 2))
    grid = F.interpolate(pos[1:].reshape(1, 3, 3, 4).permute(0, 3, 1, 2), size=(6, 2), mode="bilinear",
                         align_corners=False).permute(0, 2, 3, 1).reshape(12, 4)
    assert torch.equal(out[0], pos[0]) and torch.allclose(out[1:], grid)
    for stride, cells in ((2, (6, 2)), (1, (12, 4))):
        torch.manual_seed(0)
        rn = ModifiedResNet(layers=[1, 1, 1, 1], output_dim=16, heads=2, image_size=64, width=8)
        adapt_modified_resnet(rn, (192, 64), last_stride=stride)
        assert rn.attnpool.positional_embedding.shape == (1 + cells[0] * cells[1], 256)
        x = rn.layer4(rn.layer3(rn.layer2(rn.layer1(rn.stem(torch.randn(2, 3, 192, 64))))))
        assert tuple(x.shape[2:]) == cells
        assert rn(torch.randn(2, 3, 192, 64)).shape == (2, 16)


def test_tbps_clip_normalises_with_imagenet_statistics_as_its_code_does():
    """TBPS-CLIP's misc/data.py: Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)) after ToTensor, in
    training and at test time; the paper recipes' eval transform gives exactly that on a known image."""
    import numpy as np
    from PIL import Image

    from tbps.data.transforms import eval_transform
    from tbps.recipes.config import load_recipe

    img = Image.fromarray(np.arange(4 * 2 * 3, dtype=np.uint8).reshape(4, 2, 3) * 10)
    want = (torch.from_numpy(np.asarray(img, dtype=np.float32) / 255).permute(2, 0, 1)
            - torch.tensor([0.485, 0.456, 0.406])[:, None, None]) / torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    for name in ("tbps-clip", "tbps-clip-simplified"):
        spec = load_recipe(name).model
        got = eval_transform(img, (4, 2), spec.mean, spec.std)
        assert torch.allclose(got, want, atol=1e-6), name
    assert load_recipe("tbps-clip-cpu").model.mean[0] == pytest.approx(0.48145466)  # CLIP's, said in its YAML
