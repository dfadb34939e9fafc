"""ITM with hard negatives (ALBEF, as used by LAIP, RaSa and APTM).

For each text, one negative image is drawn with probability proportional to
softmax(s_t2i) over the batch images of *other* identities (and symmetrically one negative
text per image); s is the scaled cosine similarity, detached. The fusion encoder's ITM
head classifies the B positive and 2B negative pairs:
L = CE([z_pos; z_neg_img; z_neg_txt], [1]*B + [0]*2B).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sample_hard_negatives(sim: torch.Tensor, query_pids: torch.Tensor, key_pids: torch.Tensor,
                          generator: torch.Generator | None = None) -> torch.Tensor:
    """sim (B, G) query-to-key scores -> (B,) key index per query, drawn from softmax(sim) over
    keys of another identity. A query with no such key falls back to a uniform draw over
    all other keys (its "negative" then shares its id; only possible with one identity)."""
    same = query_pids[:, None] == key_pids[None, :]
    weights = F.softmax(sim.detach().float(), dim=1).masked_fill(same, 0.0)
    none = weights.sum(dim=1) <= 0
    if none.any():
        weights[none] = 1.0
    weights = weights + 1e-12 * (~same).float()  # underflowed rows still draw a negative
    return torch.multinomial(weights, 1, generator=generator).squeeze(1)


def itm_loss(pos_logits: torch.Tensor, neg_logits: torch.Tensor) -> torch.Tensor:
    """(B, 2) logits of matched pairs and (N, 2) of unmatched ones -> mean CE over all pairs."""
    logits = torch.cat([pos_logits, neg_logits])
    labels = torch.cat([torch.ones(len(pos_logits)), torch.zeros(len(neg_logits))]).long().to(logits.device)
    return F.cross_entropy(logits, labels)
