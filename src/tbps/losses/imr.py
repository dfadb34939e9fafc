"""L_imr: MeFa's intra-modal separation (margin) loss against hard negatives.

With cosine distance d(x, y) = 1 - cos(x, y) and margin alpha (paper eq. 1):

    L_imr = mean over (i, t) valid of  max(0, alpha + d(a_i, p_i) - d(a_i, n_it))
          = mean over (i, t) valid of  max(0, alpha - cos(a_i, p_i) + cos(a_i, n_it))

a_i is the anchor (IMR(T): the image; IMR(V): the caption), p_i its matching feature of the
other modality, n_it the t-th hard negative (IMR(T): a rewritten caption; IMR(V): an image of
another person). The paper calls D "the cosine similarity", but with a similarity eq. 1 would
push positives away; read as a distance, eqs. 1 and 2 agree (eq. 2's min over negatives is
then the hardest one). Features are L2-normalised by the caller.
"""

from __future__ import annotations

import torch


def imr_loss(anchor: torch.Tensor, positive: torch.Tensor, negatives: torch.Tensor, valid: torch.Tensor,
             margin: float) -> torch.Tensor:
    """(B, D), (B, D), (B, T, D), bool (B, T) -> scalar; 0 when no negative is valid."""
    pos = (anchor * positive).sum(-1)  # (B,) cosine
    neg = torch.einsum("bd,btd->bt", anchor, negatives)  # (B, T)
    hinge = (margin - pos[:, None] + neg).clamp_min(0)
    n = valid.sum()
    return (hinge * valid).sum() / n.clamp_min(1)
