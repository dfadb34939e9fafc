"""R-ITC: reverse KL to the identity distribution (TBPS-CLIP, AAAI'24).

L = 1/2 [KL(p_i2t || q + eps) + KL(p_t2i || q + eps)], p = softmax(s), eps = 1e-2,
averaged over queries (batchmean). Close to IRRA's SDM, with the KL reversed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tbps.losses.common import identity_targets


def _reverse_kl(logits: torch.Tensor, q: torch.Tensor, eps: float) -> torch.Tensor:
    log_p = F.log_softmax(logits, dim=1)
    p = log_p.exp()
    return (p * (log_p - torch.log(q + eps))).sum(dim=1).mean()


def ritc_loss(
    image_local: torch.Tensor,
    text_local: torch.Tensor,
    image_global: torch.Tensor,
    text_global: torch.Tensor,
    pids_local: torch.Tensor,
    pids_global: torch.Tensor,
    logit_scale: torch.Tensor,
    eps: float = 1e-2,
) -> torch.Tensor:
    """Same inputs as :func:`tbps.losses.nitc_loss`."""
    q = identity_targets(pids_local, pids_global)
    s_i2t = logit_scale * image_local @ text_global.t()
    s_t2i = logit_scale * text_local @ image_global.t()
    return 0.5 * (_reverse_kl(s_i2t, q, eps) + _reverse_kl(s_t2i, q, eps))
