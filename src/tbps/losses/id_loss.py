"""ID loss: identity classification with label smoothing (TextReID, BMVC'21; IRRA, CVPR'23).

A classifier W (P x D) shared by both modalities scores the unnormalised features;
with smoothing e and P classes the target of class c is (1 - e) 1[c = y] + e / P:

    reduction "mean" (IRRA):     L = 1/2 [CE_e(W v, y) + CE_e(W t, y)]
    reduction "sum"  (TextReID): L =      CE_e(W v, y) + CE_e(W t, y)

TextReID's classifier is :class:`NormalizedClassifier`: no bias, each class vector L2-normalised
at every forward (logits = v . w_c / |w_c|); IRRA's is an ``nn.Linear`` with a bias.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class NormalizedClassifier(nn.Module):
    """logits = x @ normalize(W, dim=1)^T: class vectors of unit length, no bias (TextReID's
    ``instance_loss`` projection, Xavier-uniform initialised). x (B, D) -> (B, P)."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_classes, dim))  # (P, D)
        nn.init.xavier_uniform_(self.weight, gain=1.0)  # symmetric in fan-in/out: TextReID's (D, P) layout alike

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ F.normalize(self.weight, dim=1).to(x.dtype).t()


def id_loss(classifier: nn.Module, image: torch.Tensor, text: torch.Tensor, pids: torch.Tensor,
            smoothing: float = 0.1, reduction: str = "mean") -> torch.Tensor:
    """classifier: (B, D) -> (B, P) logits; image, text: (B, D); pids: (B,) in 0..P-1.
    ``reduction``: "mean" halves the sum of the two modalities' losses (IRRA), "sum" does not (TextReID)."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"id loss reduction must be 'mean' or 'sum', got {reduction!r}")
    total = (F.cross_entropy(classifier(image).float(), pids, label_smoothing=smoothing)
             + F.cross_entropy(classifier(text).float(), pids, label_smoothing=smoothing))
    return 0.5 * total if reduction == "mean" else total
