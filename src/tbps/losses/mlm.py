"""Masked-token losses through the fusion encoder: MLM (IRRA) and MPM (LAIP).

L = -1/M sum_{masked m} log softmax(h(z_m))[y_m], the cross-entropy of the vocabulary head h
over the M masked positions (labels -100 elsewhere). MPM is the same loss with the single
masked token of each noun phrase.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100


def masked_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """logits (M, V) of the selected positions, labels (M,) -> mean CE (0 in the graph if M = 0)."""
    if labels.numel() == 0:
        return logits.sum() * 0.0
    return F.cross_entropy(logits, labels)
