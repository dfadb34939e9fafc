"""Shared pieces of the contrastive losses."""

from __future__ import annotations

import torch


def identity_targets(query_pids: torch.Tensor, key_pids: torch.Tensor) -> torch.Tensor:
    """q[i, j] = 1[pid_i == pid_j] / #{j : pid_i == pid_j}: (Bq,), (Bk,) -> (Bq, Bk).

    Each row sums to 1; every query has at least one positive (its own pair).
    """
    mask = (query_pids[:, None] == key_pids[None, :]).float()
    return mask / mask.sum(dim=1, keepdim=True).clamp_min(1.0)
