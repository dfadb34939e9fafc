"""Each loss against a hand computation or a naive loop on small tensors."""

import math

import torch
import torch.nn.functional as F

from tbps.losses import citc_loss, identity_targets, nitc_loss, ritc_loss, simclr_loss


def test_identity_targets_rows_normalised():
    q = identity_targets(torch.tensor([0, 1, 0]), torch.tensor([0, 1, 0]))
    expected = torch.tensor([[0.5, 0, 0.5], [0, 1, 0], [0.5, 0, 0.5]])
    assert torch.allclose(q, expected)


def _two_pairs():
    # 2 images, 2 texts in 2-D, unit norm; persons 0 and 1.
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    txt = torch.tensor([[0.6, 0.8], [0.8, -0.6]])
    return img, txt, torch.tensor([0, 1])


def test_nitc_hard_labels_by_hand():
    img, txt, pid = _two_pairs()
    scale = torch.tensor(2.0)
    # i2t logits: img @ txt^T * 2 = [[1.2, 1.6], [1.6, -1.2]]; t2i: txt @ img^T * 2 = [[1.2, 1.6], [1.6, -1.2]]
    row0 = -math.log(math.exp(1.2) / (math.exp(1.2) + math.exp(1.6)))
    row1 = -math.log(math.exp(-1.2) / (math.exp(1.6) + math.exp(-1.2)))
    expected = 0.5 * ((row0 + row1) / 2 + (row0 + row1) / 2)
    got = nitc_loss(img, txt, img, txt, pid, pid, scale, alpha=0.0)
    assert abs(got.item() - expected) < 1e-5


def test_nitc_soft_labels_mix_detached_prediction():
    torch.manual_seed(0)
    img, txt = F.normalize(torch.randn(4, 8), dim=-1), F.normalize(torch.randn(4, 8), dim=-1)
    pid = torch.tensor([0, 0, 1, 2])
    scale, a = torch.tensor(10.0), 0.3
    q = identity_targets(pid, pid)

    def naive(s):
        t = a * F.softmax(s, 1) + (1 - a) * q
        return sum(-(t[i] * F.log_softmax(s[i], 0)).sum() for i in range(4)) / 4

    expected = 0.5 * (naive(scale * img @ txt.t()) + naive(scale * txt @ img.t()))
    assert torch.allclose(nitc_loss(img, txt, img, txt, pid, pid, scale, alpha=a), expected, atol=1e-6)


def test_nitc_soft_targets_are_detached():
    img = F.normalize(torch.randn(3, 4), dim=-1).requires_grad_()
    txt = F.normalize(torch.randn(3, 4), dim=-1)
    pid = torch.arange(3)
    s = torch.tensor(5.0)
    nitc_loss(img, txt, img, txt, pid, pid, s, alpha=0.5).backward()
    g1 = img.grad.clone()
    img.grad = None
    # The gradient equals that of a CE against fixed targets built from a detached copy.
    with torch.no_grad():
        t_i2t = 0.5 * F.softmax(s * img @ txt.t(), 1) + 0.5 * torch.eye(3)
        t_t2i = 0.5 * F.softmax(s * txt @ img.t(), 1) + 0.5 * torch.eye(3)
    loss = 0.5 * (-(t_i2t * F.log_softmax(s * img @ txt.t(), 1)).sum(1).mean()
                  - (t_t2i * F.log_softmax(s * txt @ img.t(), 1)).sum(1).mean())
    loss.backward()
    assert torch.allclose(g1, img.grad, atol=1e-6)


def test_ritc_reverse_kl_by_hand():
    img, txt, pid = _two_pairs()
    scale, eps = torch.tensor(2.0), 0.01
    p0 = torch.softmax(torch.tensor([1.2, 1.6]), 0)
    p1 = torch.softmax(torch.tensor([1.6, -1.2]), 0)
    q0, q1 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    kl = lambda p, q: (p * (p.log() - (q + eps).log())).sum()  # noqa: E731
    expected = 0.5 * 2 * (kl(p0, q0) + kl(p1, q1)) / 2
    assert abs(ritc_loss(img, txt, img, txt, pid, pid, scale, eps).item() - expected.item()) < 1e-5


def test_citc_by_hand():
    img, txt, _ = _two_pairs()
    s_ii, s_tt = img @ img.t(), txt @ txt.t()  # identity; [[1, 0], [0, 1]]
    s_it = img @ txt.t()  # [[0.6, 0.8], [0.8, -0.6]], symmetric: second term 0
    expected = 0.25 * ((s_ii - s_tt) ** 2).mean() + 0.25 * ((s_it - s_it.t()) ** 2).mean()
    assert abs(expected.item()) < 1e-7  # both unit-norm pairs: a consistent geometry costs nothing
    txt2 = torch.tensor([[1.0, 0.0], [1.0, 0.0]])  # texts collapse: S_tt = all ones
    # (S_ii - S_tt)^2 = [[0,1],[1,0]] -> mean 0.5; S_it = [[1,1],[0,0]] - S_ti = [[1,0],[1,0]] -> [[0,1],[-1,0]] mean 0.5
    assert abs(citc_loss(img, txt2, img, txt2).item() - (0.25 * 0.5 + 0.25 * 0.5)) < 1e-6


def test_simclr_matches_naive_loop():
    torch.manual_seed(1)
    z1, z2 = torch.randn(3, 5), torch.randn(3, 5)
    t = 0.1
    z = F.normalize(torch.cat([z1, z2]), dim=-1)
    n = 3
    total = 0.0
    for i in range(2 * n):
        partner = (i + n) % (2 * n)
        others = [k for k in range(2 * n) if k != i]
        num = torch.exp(z[i] @ z[partner] / t)
        den = sum(torch.exp(z[i] @ z[k] / t) for k in others)
        total += -torch.log(num / den)
    expected = total / (2 * n)
    assert torch.allclose(simclr_loss(z1, z2, z1, z2, temperature=t), expected, atol=1e-5)


def test_simclr_local_rows_against_global():
    torch.manual_seed(2)
    z1, z2 = torch.randn(4, 5), torch.randn(4, 5)
    full = simclr_loss(z1, z2, z1, z2)
    # two "ranks" of 2 rows each: the mean of their local losses is the global loss
    halves = [simclr_loss(z1[r * 2:(r + 1) * 2], z2[r * 2:(r + 1) * 2], z1, z2, offset=r * 2) for r in range(2)]
    assert torch.allclose(full, sum(halves) / 2, atol=1e-6)
