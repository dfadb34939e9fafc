"""MeFa's cross-modal refinement (CMR, eqs. 3-5) and discriminative-clue selection (DCC).

**CMR.** For an image with patch tokens v_1..v_N (global g_v) and its caption with word tokens
t_1..t_M (global g_t), all in the joint space:

    a_ij = exp(cos(v_i, t_j) / T)                       (T = 1: the paper's exp(s))
    w^v_i = sum_j a_ij / sum_ij a_ij,   w^t_j = sum_i a_ij / sum_ij a_ij            (eq. 3)
    (``token_scale="count"``: times N and M, so that uniform attention leaves a token unchanged)
    v^_i = w^v_i v_i,   t^_j = w^t_j t_j
    u_i = [v^_i ; g_v],  v'_i = u_i * tanh(W_f u_i + b_f)                              (eq. 4)
    u_j = [t^_j ; g_t],  t'_j = u_j * tanh(W_f u_j + b_f)   (same W_f, b_f: eq. 5)     (eq. 5)
    r_v = W_o mean_i v'_i,   r_t = W_o mean_j t'_j     (2D -> D, back to the joint space)

Eq. 3 as printed normalises by the double sum over all (patch, word) pairs and nothing else, so
the weights of an image's patches sum to 1 (the default, ``token_scale="none"``); tbps first
scaled them by the token count (``"count"``), which the paper does not write. Choices the paper
leaves open: g is each modality's own global feature; the refined tokens are
mean-pooled and projected by W_o so that N-ITC (eq. 6) compares D-dim vectors. An image is
refined with its own caption and a caption with its own image (B pairs, not all B^2: the
all-pairs form costs B^2 N M and does not fit a batch of 80 at 224x224). Inference does not use
the refiner: the search index keeps the dual encoder's global features.

**DCC.** Words are ranked by their cosine similarity to the paired image's global feature;
the top ``skip_top`` (the prominent nouns the pretrained model already matches) and the bottom
``skip_bottom`` (articles, conjunctions) are passed over and the next ``words`` are the clues.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


TOKEN_SCALES = ("none", "count")  # eq. 3 as printed; times the token counts (tbps before the check)


class CrossModalRefiner(nn.Module):
    """Re-weights each modality's tokens by cross-modal affinity, gates them with the global
    feature and pools them into a refined (B, D) feature per modality."""

    def __init__(self, dim: int, temperature: float = 1.0, token_scale: str = "none"):
        super().__init__()
        if token_scale not in TOKEN_SCALES:
            raise ValueError(f"token_scale {token_scale!r}: none (eq. 3 as printed) or count")
        self.temperature = float(temperature)
        self.token_scale = token_scale
        self.gate = nn.Linear(2 * dim, 2 * dim)  # W_f, b_f (shared by both modalities)
        self.out = nn.Linear(2 * dim, dim)  # W_o

    def weights(self, v: torch.Tensor, t: torch.Tensor, t_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, N, D) patches, (B, M, D) words, bool (B, M) -> (B, N) and (B, M) token weights (eq. 3)."""
        s = torch.einsum("bnd,bmd->bnm", F.normalize(v, dim=-1), F.normalize(t, dim=-1)) / self.temperature
        s = s.masked_fill(~t_mask[:, None, :], float("-inf"))
        b, n, m = s.shape
        p = s.flatten(1).softmax(dim=1).view(b, n, m)  # one softmax over all (patch, word) pairs
        w_v, w_t = p.sum(dim=2), p.sum(dim=1)  # each sums to 1 over its tokens (eq. 3)
        if self.token_scale == "count":
            w_v, w_t = w_v * n, w_t * t_mask.sum(dim=1, keepdim=True).to(p.dtype)
        return w_v, w_t

    def refine(self, tokens: torch.Tensor, weights: torch.Tensor, glob: torch.Tensor,
               mask: torch.Tensor | None = None) -> torch.Tensor:
        """Eqs. 4-5 and the pooling: (B, L, D), (B, L), (B, D) -> (B, D)."""
        u = torch.cat([weights[..., None] * tokens, glob[:, None, :].expand_as(tokens)], dim=-1)  # (B, L, 2D)
        r = u * torch.tanh(self.gate(u))
        if mask is None:
            pooled = r.mean(dim=1)
        else:
            m = mask[..., None].to(r.dtype)
            pooled = (r * m).sum(dim=1) / m.sum(dim=1).clamp_min(1)
        return self.out(pooled)

    def forward(self, v: torch.Tensor, v_glob: torch.Tensor, t: torch.Tensor, t_mask: torch.Tensor,
                t_glob: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w_v, w_t = self.weights(v, t, t_mask)
        return self.refine(v, w_v, v_glob), self.refine(t, w_t, t_glob, t_mask)


def select_clue_words(word_sim: torch.Tensor, word_mask: torch.Tensor, skip_top: int, words: int,
                      skip_bottom: int) -> torch.Tensor:
    """Secondary-similarity words: (B, L) similarities, bool (B, L) real words -> bool (B, L).

    Among a row's n real words ranked by similarity (highest first), ranks
    [skip_top, n - skip_bottom) are candidates and the first ``words`` of them are chosen.
    A caption too short for that keeps the word ranked min(skip_top, n - 1) (never none).
    """
    sim = word_sim.detach().masked_fill(~word_mask, float("-inf"))
    order = sim.argsort(dim=1, descending=True)  # (B, L)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    n = word_mask.sum(dim=1, keepdim=True)  # (B, 1)
    lo = torch.full_like(n, skip_top)
    hi = torch.minimum(n - skip_bottom, lo + words)
    short = hi <= lo  # too short for the window: one word at rank min(skip_top, n - 1)
    lo = torch.where(short, (n - 1).clamp(min=0).clamp(max=skip_top), lo)
    hi = torch.where(short, lo + 1, hi)
    return (rank >= lo) & (rank < hi) & word_mask
