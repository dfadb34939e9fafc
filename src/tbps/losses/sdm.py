"""SDM: similarity distribution matching (IRRA, CVPR'23).

L = KL(p_i2t || q) + KL(p_t2i || q), each averaged over queries, where
p = softmax(tau^-1 * cos(query, keys)) with a fixed tau^-1 = 50 (temperature 0.02), and
q the row-normalised same-person mask. As IRRA computes it:
KL(p || q) = sum_j p_j (log p_j - log(q_j + eps)), eps = 1e-8. The two directions are
summed (not averaged), as in IRRA.
"""

from __future__ import annotations

import torch

from tbps.losses.common import cross_logits, identity_targets, kl_to_targets


def sdm_loss(
    image_local: torch.Tensor,
    text_local: torch.Tensor,
    image_global: torch.Tensor,
    text_global: torch.Tensor,
    pids_local: torch.Tensor,
    pids_global: torch.Tensor,
    logit_scale: float | torch.Tensor = 50.0,
    eps: float = 1e-8,
) -> torch.Tensor:
    """L2-normalised features: (B, D) local queries, (G, D) global keys; ``logit_scale`` = 1/tau."""
    q = identity_targets(pids_local, pids_global)  # (B, G)
    s_i2t, s_t2i = cross_logits(image_local, text_local, image_global, text_global, logit_scale)
    return kl_to_targets(s_i2t, q, eps) + kl_to_targets(s_t2i, q, eps)
