"""L_imc: MeFa's intra-modal contrastive loss over the hardest negative (paper eq. 2).

With cosine distance d = 1 - cos and scale gamma:

    L_imc = 1/N' sum_i log(1 + exp(gamma * (d(a_i, p_i) - min_{n in N_i} d(a_i, n))))
          = 1/N' sum_i softplus(gamma * (max_{n in N_i} cos(a_i, n) - cos(a_i, p_i)))

over the N' rows that have at least one valid negative (N_i, the sample's set of hard
negatives). As in :mod:`tbps.losses.imr`, D is read as a distance so that minimising the loss
separates the positive from its hardest negative.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def imc_loss(anchor: torch.Tensor, positive: torch.Tensor, negatives: torch.Tensor, valid: torch.Tensor,
             gamma: float) -> torch.Tensor:
    """(B, D), (B, D), (B, T, D), bool (B, T) -> scalar; 0 when no row has a valid negative."""
    pos = (anchor * positive).sum(-1)  # (B,)
    neg = torch.einsum("bd,btd->bt", anchor, negatives).masked_fill(~valid, float("-inf"))
    hardest = neg.max(dim=1).values  # (B,)
    rows = valid.any(dim=1)
    if not rows.any():
        return anchor.sum() * 0.0
    return F.softplus(gamma * (hardest[rows] - pos[rows])).mean()
