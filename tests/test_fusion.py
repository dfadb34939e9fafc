"""Fusion encoder: attention maps, backward attention against finite differences, BidirAtt weights."""

from __future__ import annotations

import torch

from tbps.losses.bidiratt import backward_attention, bidir_weights, bidiratt_loss
from tbps.models.fusion import FusionEncoder


def _tiny(vocab=50, layers=3):
    torch.manual_seed(0)
    return FusionEncoder(8, width=16, layers=layers, heads=2, mlp_ratio=2.0, vocab_size=vocab).double()


def _inputs(b=2, l=5, n=4):
    g = torch.Generator().manual_seed(1)
    text = torch.randn(b, l, 8, generator=g, dtype=torch.float64)
    mask = torch.ones(b, l, dtype=torch.bool)
    mask[1, 3:] = False  # padding in the second row
    image = torch.randn(b, n, 8, generator=g, dtype=torch.float64)
    return text, mask, image


def test_cross_attention_rows_are_distributions_and_padding_does_not_leak():
    f = _tiny().eval()
    text, mask, image = _inputs()
    out = f(text, mask, image)
    assert out.hidden.shape == (2, 5, 16) and len(out.cross_attn) == 3
    for a in out.cross_attn:
        assert a.shape == (2, 2, 5, 4)
        torch.testing.assert_close(a.sum(-1), torch.ones(2, 2, 5, dtype=torch.float64))
    # Changing a padded token's features changes nothing for the real tokens of that row.
    text2 = text.clone()
    text2[1, 4] += 10.0
    out2 = f(text2, mask, image)
    torch.testing.assert_close(out2.hidden[1, :3], out.hidden[1, :3])
    # An image-token mask is honoured: masked memory tokens get zero attention.
    imask = torch.tensor([[True, True, False, True]] * 2)
    out3 = f(text, mask, image, imask)
    assert float(out3.cross_attn[0][..., 2].detach().abs().max()) == 0.0


def test_backward_attention_matches_finite_differences():
    f = _tiny().eval()
    text, mask, image = _inputs()
    layer, pos, label = 1, torch.tensor([[False, False, True, False, False], [False, True, False, False, False]]), torch.tensor([7, 3])

    def score_with(override=None):
        out = f(text, mask, image, attn_override=None if override is None else {layer: override})
        logits = f.mlm_logits(out, pos)  # (2, V)
        return logits.gather(1, label[:, None]).squeeze(1), out

    score, out = score_with()
    attn = out.cross_attn[layer]
    grad = backward_attention(score, attn)
    assert grad.shape == attn.shape and float(grad.abs().max()) > 0
    base = attn.detach()
    # The override reproduces the plain forward exactly.
    torch.testing.assert_close(score_with(base.clone())[0], score.detach())
    eps = 1e-6
    for idx in [(0, 0, 0, 1), (0, 1, 0, 3), (1, 0, 0, 2), (1, 1, 2, 0), (0, 0, 2, 2)]:
        plus, minus = base.clone(), base.clone()
        plus[idx] += eps
        minus[idx] -= eps
        b = idx[0]
        fd = (score_with(plus)[0][b] - score_with(minus)[0][b]) / (2 * eps)
        torch.testing.assert_close(grad[idx], fd.detach(), rtol=1e-5, atol=1e-8)
    # Sample 0's score does not depend on sample 1's maps.
    (g0,) = torch.autograd.grad(score[0], attn, retain_graph=True)
    assert float(g0[1].abs().max()) == 0.0


def test_last_layer_first_row_gets_no_gradient_from_a_later_token():
    # As the LAIP paper notes: the last layer's first-row attention cannot reach a masked word's output.
    f = _tiny(layers=2).eval()
    text, mask, image = _inputs()
    pos = torch.zeros(2, 5, dtype=torch.bool)
    pos[:, 2] = True
    out = f(text, mask, image)
    score = f.mlm_logits(out, pos)[:, 4]
    grad = backward_attention(score, out.cross_attn[-1])
    assert float(grad[:, :, 0].abs().max()) == 0.0
    assert float(backward_attention(score, out.cross_attn[0])[:, :, 0].abs().max()) > 0


def test_bidir_weights_against_a_hand_computation():
    attn = torch.tensor([[[[0.1, 0.2, 0.3, 0.4]], [[0.3, 0.4, 0.2, 0.1]]]])  # (1, 2 heads, 1 row, 4)
    grad = torch.tensor([[[[5.0, 1.0, -2.0, 3.0]], [[1.0, 3.0, -4.0, 1.0]]]])
    fwd = torch.tensor([0.3, 0.25, 0.25]) / 0.8  # heads averaged, global token skipped
    bwd = torch.tensor([2.0, 0.0, 2.0]) / 4.0  # relu then head mean: [2, 0, 2]
    # ALBEF's Grad-CAM: attention x relu(gradient) per head, then the head mean:
    # head 1 [0.2*1, 0.3*0, 0.4*3] = [0.2, 0, 1.2], head 2 [0.4*3, 0.2*0, 0.1*1] = [1.2, 0, 0.1] -> [0.7, 0, 0.65]
    gradcam = torch.tensor([0.7, 0.0, 0.65]) / 1.35
    mean_first = torch.tensor([0.3 * 2, 0.0, 0.25 * 2]) / 1.1  # LAIP's text: head means first, then the product
    torch.testing.assert_close(bidir_weights(attn, None, "forward")[0], fwd)
    torch.testing.assert_close(bidir_weights(attn, grad, "backward")[0], bwd)
    torch.testing.assert_close(bidir_weights(attn, grad, "both")[0], gradcam)
    torch.testing.assert_close(bidir_weights(attn, grad, "both", heads="mean_first")[0], mean_first)
    # All-zero gradients fall back to uniform weights.
    torch.testing.assert_close(bidir_weights(attn, -grad.abs(), "backward")[0], torch.full((3,), 1 / 3))


def test_bidir_weights_are_detached_unless_asked():
    attn = torch.tensor([[[[0.1, 0.2, 0.3, 0.4]], [[0.3, 0.4, 0.2, 0.1]]]], requires_grad=True)
    grad = torch.tensor([[[[5.0, 1.0, -2.0, 3.0]], [[1.0, 3.0, -4.0, 1.0]]]])
    for mode in ("forward", "both"):
        assert not bidir_weights(attn, grad, mode).requires_grad  # Grad-CAM's map: a constant pooling weight
        w = bidir_weights(attn, grad, mode, detach=False)
        (g,) = torch.autograd.grad(w[0, 0], attn)
        assert g[0, :, 0, 1:].abs().sum() > 0  # the old behaviour: the loss reaches the attention


def test_bidiratt_loss_against_naive_reference():
    torch.manual_seed(0)
    w = torch.rand(3, 4)
    w = w / w.sum(1, keepdim=True)
    patches, phrase = torch.randn(3, 4, 6), torch.randn(3, 6)
    targets = torch.eye(3)
    loss = bidiratt_loss(w, patches, phrase, targets, 10.0)
    ref = 0.0
    v = [sum(w[i, n] * patches[i, n] for n in range(4)) for i in range(3)]
    v = [x / x.norm() for x in v]
    p = [x / x.norm() for x in phrase]
    s = torch.tensor([[10.0 * float(v[i] @ p[j]) for j in range(3)] for i in range(3)])
    for i in range(3):
        ref += -torch.log_softmax(s[i], 0)[i] / 3 * 0.5 - torch.log_softmax(s[:, i], 0)[i] / 3 * 0.5
    torch.testing.assert_close(loss, ref.float(), rtol=1e-5, atol=1e-5)
