"""R-ITC: reverse KL to the identity distribution (TBPS-CLIP, AAAI'24).

L = 1/2 [KL(p_i2t || q + eps) + KL(p_t2i || q + eps)], p = softmax(s), eps = 1e-2,
averaged over queries (batchmean). Close to IRRA's SDM, with the KL reversed.
"""

from __future__ import annotations

import torch

from tbps.losses.common import cross_logits, identity_targets, kl_to_targets


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
    s_i2t, s_t2i = cross_logits(image_local, text_local, image_global, text_global, logit_scale)
    return 0.5 * (kl_to_targets(s_i2t, q, eps) + kl_to_targets(s_t2i, q, eps))
