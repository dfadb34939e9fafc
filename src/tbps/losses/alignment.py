"""TextReID's alignment loss on the in-batch cross-modal cosine matrix (BMVC'21).

With s_ij = cos(v_i, t_j) for local images against (global) texts and y_ij = 1[pid_i == pid_j]:

    L = 2/B * [ sum_{y=1} log(1 + exp(-a_p (s - m_p))) + sum_{y=0} log(1 + exp(a_n (s - m_n))) ],

a_p = 10, m_p = 0.6, a_n = 40, m_n = 0.4 (the reference code's sum-then-scale
normalisation). Positives are pulled above 0.6, negatives pushed below 0.4.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def alignment_loss(
    image: torch.Tensor,
    text: torch.Tensor,
    pids_image: torch.Tensor,
    pids_text: torch.Tensor,
    *,
    scale_pos: float = 10.0,
    margin_pos: float = 0.6,
    scale_neg: float = 40.0,
    margin_neg: float = 0.4,
) -> torch.Tensor:
    """image (B, D), text (G, D) L2-normalised; pids (B,), (G,). Softplus keeps it finite."""
    s = image @ text.t()  # (B, G)
    pos = pids_image[:, None] == pids_text[None, :]
    loss_pos = F.softplus(-scale_pos * (s - margin_pos))[pos].sum()
    loss_neg = F.softplus(scale_neg * (s - margin_neg))[~pos].sum()
    return (loss_pos + loss_neg) * 2.0 / image.shape[0]
