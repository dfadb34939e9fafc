"""ITC with momentum encoders and queues (ALBEF, as LAIP/RaSa/APTM use it).

With normalised queries v, t (B, D) from the online encoders and momentum keys v', t'
of the batch followed by the queues (B + K keys):
s_i2t = v @ [t'; Q_t]^T / T,  s_t2i = t @ [v'; Q_v]^T / T,
targets y = row-normalised same-person mask over the B + K key ids (empty slots excluded),
optionally distilled: y <- alpha * softmax(s'_i2t) + (1 - alpha) * y with s' the momentum
queries' similarities (ALBEF's momentum distillation, alpha = 0.4).
L = 1/2 [CE(s_i2t, y_i2t) + CE(s_t2i, y_t2i)].

The momentum copy and the queues are :class:`tbps.models.momentum.MomentumEncoder` and
:class:`tbps.models.momentum.FeatureQueue` (shared with TextReID's CM-MoCo).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def itc_queue_loss(image_q: torch.Tensor, text_q: torch.Tensor, image_k: torch.Tensor, text_k: torch.Tensor,
                   image_queue: torch.Tensor, text_queue: torch.Tensor, queue_ids: torch.Tensor,
                   pids: torch.Tensor, temperature: torch.Tensor | float, alpha: float = 0.0) -> torch.Tensor:
    """Queries (B, D), keys (B, D) of the same pairs, queues (K, D) with ids (K,) (-1 = empty)."""
    keep = queue_ids >= 0
    t_all = torch.cat([text_k, text_queue[keep]])  # (B + K', D)
    v_all = torch.cat([image_k, image_queue[keep]])
    ids_all = torch.cat([pids, queue_ids[keep]])
    y = (pids[:, None] == ids_all[None, :]).float()
    y = y / y.sum(dim=1, keepdim=True)
    s_i2t = image_q @ t_all.t() / temperature
    s_t2i = text_q @ v_all.t() / temperature
    y_i2t = y_t2i = y
    if alpha > 0:
        with torch.no_grad():
            y_i2t = alpha * F.softmax(image_k @ t_all.t() / temperature, dim=1) + (1 - alpha) * y
            y_t2i = alpha * F.softmax(text_k @ v_all.t() / temperature, dim=1) + (1 - alpha) * y
    ce = lambda s, t: -(t * F.log_softmax(s, dim=1)).sum(dim=1).mean()
    return 0.5 * (ce(s_i2t, y_i2t) + ce(s_t2i, y_t2i))
