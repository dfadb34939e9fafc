"""N-ITC: image-text contrast with soft, identity-aware targets (TBPS-CLIP, AAAI'24).

L = 1/2 [CE(s_i2t, t_i2t) + CE(s_t2i, t_t2i)],  t = a * softmax(s') + (1 - a) * q,
with s the scaled cosine similarity of local queries to global keys, q the row-normalised
same-person mask and s' the similarity the soft labels come from: by default s.detach() (the
same forward pass), or, as TBPS-CLIP's code does, the similarity of features from a second
forward pass of the same batch under no_grad (``soft_i2t`` / ``soft_t2i``; in train mode, so with
fresh dropout). ``a`` is ramped from 0 by the caller.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tbps.losses.common import cross_logits, identity_targets


def _soft_ce(logits: torch.Tensor, targets: torch.Tensor, alpha: float, soft: torch.Tensor | None) -> torch.Tensor:
    if alpha > 0:
        soft = logits.detach() if soft is None else soft.detach()
        targets = alpha * F.softmax(soft, dim=1) + (1.0 - alpha) * targets
    return -(targets * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


def nitc_loss(
    image_local: torch.Tensor,
    text_local: torch.Tensor,
    image_global: torch.Tensor,
    text_global: torch.Tensor,
    pids_local: torch.Tensor,
    pids_global: torch.Tensor,
    logit_scale: torch.Tensor,
    alpha: float = 0.0,
    soft_i2t: torch.Tensor | None = None,
    soft_t2i: torch.Tensor | None = None,
) -> torch.Tensor:
    """Features are L2-normalised: (B, D) local, (G, D) global; ``logit_scale`` is exp'd (a scalar).
    ``soft_i2t``, ``soft_t2i``: (B, G) scaled similarities the soft labels come from (None: this pass's)."""
    q = identity_targets(pids_local, pids_global)  # (B, G)
    s_i2t, s_t2i = cross_logits(image_local, text_local, image_global, text_global, logit_scale)  # (B, G) each
    return 0.5 * (_soft_ce(s_i2t, q, alpha, soft_i2t) + _soft_ce(s_t2i, q, alpha, soft_t2i))
