"""C-ITC: cyclic consistency of the similarity matrices (CyCLIP, as used by TBPS-CLIP).

L = 1/4 mean((S_ii - S_tt)^2) + 1/4 mean((S_it - S_it^T)^2), on cosine similarities
(CyCLIP divides its scaled logits by the scale squared, i.e. the same thing). With local
rows against global columns, S_it^T's local rows are T_local @ I_global^T.
"""

from __future__ import annotations

import torch


def citc_loss(
    image_local: torch.Tensor,
    text_local: torch.Tensor,
    image_global: torch.Tensor,
    text_global: torch.Tensor,
) -> torch.Tensor:
    """L2-normalised features: (B, D) local, (G, D) global."""
    s_ii = image_local @ image_global.t()  # (B, G)
    s_tt = text_local @ text_global.t()
    s_it = image_local @ text_global.t()
    s_ti = text_local @ image_global.t()  # local rows of S_it^T
    return 0.25 * (s_ii - s_tt).pow(2).mean() + 0.25 * (s_it - s_ti).pow(2).mean()
