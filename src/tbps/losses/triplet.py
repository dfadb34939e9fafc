"""Fusion triplet loss (LAIP): the matched pair must beat both hard negatives by a margin.

L = mean_i [ max(0, m - s(t_i, v_i) + s(t_i, v_i^-)) + max(0, m - s(t_i, v_i) + s(t_i^-, v_i)) ],
with s the fusion encoder's match probability (softmax of the ITM logits, in [0, 1]) and
m = 0.6 (the paper's best margin).
"""

from __future__ import annotations

import torch


def fusion_triplet_loss(s_pos: torch.Tensor, s_neg_image: torch.Tensor, s_neg_text: torch.Tensor,
                        margin: float = 0.6) -> torch.Tensor:
    """(B,) match scores of the positive pairs, of (text, negative image) and (negative text, image)."""
    return ((margin - s_pos + s_neg_image).clamp_min(0) + (margin - s_pos + s_neg_text).clamp_min(0)).mean()
