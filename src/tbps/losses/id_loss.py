"""ID loss: identity classification with label smoothing (TextReID, BMVC'21; IRRA).

A classifier W (P x D) shared by both modalities scores the unnormalised features;
with smoothing e and P classes the target of class c is (1 - e) 1[c = y] + e / P:

    L = 1/2 [CE_e(W v, y) + CE_e(W t, y)],  e = 0.1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def id_loss(classifier: nn.Module, image: torch.Tensor, text: torch.Tensor, pids: torch.Tensor,
            smoothing: float = 0.1) -> torch.Tensor:
    """classifier: (B, D) -> (B, P) logits; image, text: (B, D); pids: (B,) in 0..P-1."""
    return 0.5 * (F.cross_entropy(classifier(image), pids, label_smoothing=smoothing)
                  + F.cross_entropy(classifier(text), pids, label_smoothing=smoothing))
