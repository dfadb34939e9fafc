"""CM-MoCo: FIFO queues, same-id exclusion and the EMA update, on hand-built tensors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tbps.losses.cmmoco import CMMoCo, cmmoco_loss
from tbps.models.momentum import FeatureQueue, MomentumEncoder, ema_update


def test_queue_fifo_wraps_and_keeps_ids():
    q = FeatureQueue(5, 2)
    assert not q.valid.any()
    q.enqueue(torch.tensor([[1.0, 0], [2, 0], [3, 0]]), torch.tensor([10, 11, 12]))
    assert q.ids.tolist() == [10, 11, 12, -1, -1] and int(q.ptr) == 3
    q.enqueue(torch.tensor([[4.0, 0], [5, 0], [6, 0]]), torch.tensor([13, 14, 15]))
    # Slots 3, 4 then wrap to 0: the oldest key (id 10) is the one replaced.
    assert q.ids.tolist() == [15, 11, 12, 13, 14] and int(q.ptr) == 1
    assert q.feats[:, 0].tolist() == [6, 2, 3, 4, 5]
    q.enqueue(torch.arange(14.0).reshape(7, 2), torch.arange(7))  # more than the queue: the last 5 rows
    assert sorted(q.ids.tolist()) == [2, 3, 4, 5, 6]
    assert q.feats[q.ids == 6][0].tolist() == [12.0, 13.0]


def _naive(iq, tq, ik, tk, qi, qt, qids, bids, T, query_ids=None, bik=None, btk=None):
    total = 0.0
    for q, pos, queue, bkeys in ((iq, tk, qt, btk), (tq, ik, qi, bik)):
        for i in range(q.shape[0]):
            logits = [float(q[i] @ pos[i])]
            logits += [float(q[i] @ queue[j]) for j in range(queue.shape[0])
                       if qids[j] >= 0 and int(qids[j]) not in bids.tolist()]
            if bkeys is not None:
                logits += [float(q[i] @ bkeys[j]) for j in range(bkeys.shape[0]) if int(bids[j]) != int(query_ids[i])]
            z = [v / T for v in logits]
            m = max(z)
            total += -(z[0] - m - math.log(sum(math.exp(v - m) for v in z))) / q.shape[0]
    return total


def test_cmmoco_loss_matches_naive_and_excludes_batch_ids():
    g = torch.Generator().manual_seed(0)
    n = lambda *s: F.normalize(torch.randn(*s, generator=g), dim=-1)
    iq, tq, ik, tk = n(4, 8), n(4, 8), n(4, 8), n(4, 8)
    qi, qt = n(6, 8), n(6, 8)
    pids = torch.tensor([0, 0, 1, 2])
    qids = torch.tensor([0, 5, 1, 6, -1, 7])  # ids 0 and 1 are in the batch, slot 4 is empty
    got = cmmoco_loss(iq, tq, ik, tk, qi, qt, qids, pids, 0.07)
    assert got.item() == pytest.approx(_naive(iq, tq, ik, tk, qi, qt, qids, pids, 0.07), rel=1e-5)
    # Entries of batch ids (and empty slots) must not matter at all.
    qi2, qt2 = qi.clone(), qt.clone()
    for j in (0, 2, 4):
        qi2[j], qt2[j] = iq[0], ik[3]
    assert cmmoco_loss(iq, tq, ik, tk, qi2, qt2, qids, pids, 0.07).item() == pytest.approx(got.item(), rel=1e-6)
    # ... while a kept entry does.
    qt2[1] = iq[0]
    assert cmmoco_loss(iq, tq, ik, tk, qi, qt2, qids, pids, 0.07).item() > got.item() + 1e-3
    # With the batch's own keys as extra negatives (other people's only).
    got_b = cmmoco_loss(iq, tq, ik, tk, qi, qt, qids, pids, 0.07, query_ids=pids, batch_image_k=ik, batch_text_k=tk)
    ref_b = _naive(iq, tq, ik, tk, qi, qt, qids, pids, 0.07, pids, ik, tk)
    assert got_b.item() == pytest.approx(ref_b, rel=1e-5)


def test_cmmoco_gradients_reach_queries_only():
    g = torch.Generator().manual_seed(1)
    iq = F.normalize(torch.randn(3, 4, generator=g), dim=-1).requires_grad_()
    tq = F.normalize(torch.randn(3, 4, generator=g), dim=-1).requires_grad_()
    keys = F.normalize(torch.randn(3, 4, generator=g), dim=-1)
    loss = cmmoco_loss(iq, tq, keys, keys, keys, keys, torch.tensor([7, 8, 9]), torch.tensor([0, 1, 2]))
    loss.backward()
    assert iq.grad.abs().sum() > 0 and tq.grad.abs().sum() > 0


def test_ema_update_formula_and_frozen_copy():
    online = nn.Linear(2, 1)
    with torch.no_grad():
        online.weight.fill_(1.0)
        online.bias.fill_(0.0)
    ema = MomentumEncoder(online, momentum=0.9)
    assert not any(p.requires_grad for p in ema.parameters())
    with torch.no_grad():
        online.weight.fill_(3.0)
        online.bias.fill_(1.0)
    ema.update(online)
    assert torch.allclose(ema.module.weight, torch.full((1, 2), 0.9 * 1 + 0.1 * 3))
    assert torch.allclose(ema.module.bias, torch.tensor([0.1]))
    ema.update(online)
    assert torch.allclose(ema.module.weight, torch.full((1, 2), 0.9 * 1.2 + 0.1 * 3))
    with pytest.raises(ValueError, match="parameters"):
        ema_update(nn.Linear(2, 1), nn.Sequential(nn.Linear(2, 1), nn.Linear(1, 1)), 0.5)


def test_cmmoco_module_on_a_model_fills_queues_and_moves_keys():
    from tbps.models import ModelSpec, create_model, get_tokenizer

    torch.manual_seed(0)
    model = create_model(ModelSpec(arch="micro-vit"))
    tok = get_tokenizer(model.spec)
    moco = CMMoCo(model, queue_size=6, momentum=0.5)
    batch = {"image": torch.randn(4, 3, 32, 16), "tokens": tok(["a red coat", "a man", "blue jeans", "a bag"]),
             "pid": torch.tensor([0, 0, 1, 2])}
    before = [p.clone() for p in moco.key_encoder.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)
    img = F.normalize(model.encode_image(batch["image"]), dim=-1)
    txt = F.normalize(model.encode_text(batch["tokens"]), dim=-1)
    loss = moco.loss(model, img, txt, batch)
    # Empty queues: only the positive logit, loss exactly 0 (no negatives yet).
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    after = list(moco.key_encoder.parameters())
    assert all(torch.allclose(a, 0.5 * b + 0.5 * p) for a, b, p in zip(after, before, model.parameters()))
    assert moco.image_queue.ids.tolist() == [0, 0, 1, 2, -1, -1]
    batch2 = dict(batch, pid=torch.tensor([3, 3, 4, 4]))
    loss2 = moco.loss(model, img, txt, batch2)  # now the first batch's keys are negatives
    assert loss2.item() > 0.1
    loss2.backward()
    assert all(p.grad is None for p in moco.key_encoder.parameters())
    assert moco.text_queue.ids.tolist() == [4, 4, 1, 2, 3, 3]  # slots 4, 5, then 0, 1: FIFO
    with pytest.raises(ValueError, match="no negatives"):
        CMMoCo(model, queue_size=0)


def test_alignment_and_id_losses_match_their_formulas():
    from tbps.losses import alignment_loss, id_loss

    g = torch.Generator().manual_seed(3)
    img = F.normalize(torch.randn(3, 5, generator=g), dim=-1)
    txt = F.normalize(torch.randn(4, 5, generator=g), dim=-1)
    pi, pt = torch.tensor([0, 1, 2]), torch.tensor([0, 0, 2, 3])
    ref = 0.0
    for i in range(3):
        for j in range(4):
            s = float(img[i] @ txt[j])
            ref += math.log1p(math.exp(-10 * (s - 0.6))) if pi[i] == pt[j] else math.log1p(math.exp(40 * (s - 0.4)))
    assert alignment_loss(img, txt, pi, pt).item() == pytest.approx(2 * ref / 3, rel=1e-5)
    cls = nn.Linear(5, 4)
    pids = torch.tensor([0, 3, 1])
    ref_id = 0.0
    for feats in (img, txt[:3]):
        logp = F.log_softmax(cls(feats), dim=1)
        target = torch.full((3, 4), 0.1 / 4).scatter_(1, pids[:, None], 0.9 + 0.1 / 4)
        ref_id += 0.5 * float(-(target * logp).sum(1).mean().detach())
    assert id_loss(cls, img, txt[:3], pids, 0.1).item() == pytest.approx(ref_id, rel=1e-5)
