"""Shared pieces of the contrastive losses."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def identity_targets(query_pids: torch.Tensor, key_pids: torch.Tensor) -> torch.Tensor:
    """q[i, j] = 1[pid_i == pid_j] / #{j : pid_i == pid_j}: (Bq,), (Bk,) -> (Bq, Bk).

    Each row sums to 1; every query has at least one positive (its own pair).
    """
    mask = (query_pids[:, None] == key_pids[None, :]).float()
    return mask / mask.sum(dim=1, keepdim=True).clamp_min(1.0)


def cross_logits(
    image_local: torch.Tensor,
    text_local: torch.Tensor,
    image_global: torch.Tensor,
    text_global: torch.Tensor,
    logit_scale: float | torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scaled image->text and text->image similarities of local queries to global keys:
    (B, D) x (G, D) -> two (B, G) matrices."""
    return logit_scale * image_local @ text_global.t(), logit_scale * text_local @ image_global.t()


def kl_to_targets(logits: torch.Tensor, q: torch.Tensor, eps: float) -> torch.Tensor:
    """KL(softmax(logits) || q + eps) per row, averaged over rows (batchmean)."""
    log_p = F.log_softmax(logits, dim=1)
    return (log_p.exp() * (log_p - torch.log(q + eps))).sum(dim=1).mean()
