"""RDE's token-selection embedding (TSE) branch, for converted RDE checkpoints (``tbps convert rde``).

RDE (Qin et al., CVPR'24, built on IRRA's code) scores a (caption, image) pair by the mean of two
cosines: the global one (CLS / end-of-text token, as IRRA) and the TSE one. TSE, as its evaluation
runs it:

- image: the last visual layer's attention of the CLS query over the patches (averaged over heads);
  the ``int(N * ratio)`` most attended patch tokens (N patches), each L2-normalised (``x / (|x| + 1e-8)``),
  go through ``fc(x) + mlp(x)`` (mlp: Linear, BatchNorm, ReLU, Linear) and are max-pooled;
- text: the last text layer's attention of the end-of-text query (causal); the start and end tokens are
  excluded, the ``min(int((L - 2) * ratio), words)`` most attended word tokens (L the context length) go
  through ``linear(x) + mlp(x)`` and are max-pooled.

Token features are the projected outputs of every position (after ``ln_post`` / ``ln_final``). One vector
per item keeps the index a plain dot product: ``[g / sqrt(2), t / sqrt(2)]`` with ``g`` and ``t`` the
L2-normalised global and TSE embeddings, whose dot product is the mean of the two cosines.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class TSEMLP(nn.Module):
    """RDE's two-layer MLP over tokens: Linear, BatchNorm1d, ReLU, Linear (a second BatchNorm exists in
    the checkpoint but is not applied, as in RDE)."""

    def __init__(self, input_dim: int, hidden: int, output_dim: int):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(input_dim, hidden), nn.Linear(hidden, output_dim)])
        self.bns = nn.ModuleList([nn.BatchNorm1d(hidden), nn.BatchNorm1d(output_dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        h = F.relu(self.bns[0](self.layers[0](x.reshape(b * n, d))))
        return self.layers[1](h).view(b, n, -1)


def _l2norm(x: torch.Tensor) -> torch.Tensor:
    return x / (x.pow(2).sum(dim=-1, keepdim=True).sqrt() + 1e-8)


class VisualTSE(nn.Module):
    """RDE's ``VisualEmbeddingLayer``: ``linear`` is in the checkpoint but unused at inference."""

    def __init__(self, input_dim: int, dim: int, ratio: float):
        super().__init__()
        self.ratio = ratio
        self.linear = nn.Linear(input_dim, dim)
        self.fc = nn.Linear(input_dim, dim)
        self.mlp = TSEMLP(input_dim, dim // 2, dim)

    def forward(self, tokens: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """tokens (B, 1+N, D) projected, attn (B, 1+N, 1+N) of the last layer -> (B, dim)."""
        k = int((attn.size(1) - 1) * self.ratio)
        row = attn[:, 0].clone()
        row[:, 0] = -1  # never the CLS token itself
        idx = row.topk(k, dim=-1)[1]
        x = _l2norm(torch.gather(tokens, 1, idx.unsqueeze(-1).expand(-1, -1, tokens.size(2))))
        return (self.fc(x) + self.mlp(x)).max(dim=1)[0]


class TextualTSE(nn.Module):
    """RDE's ``TexualEmbeddingLayer``."""

    def __init__(self, input_dim: int, dim: int, ratio: float):
        super().__init__()
        self.ratio = ratio
        self.linear = nn.Linear(input_dim, dim)
        self.mlp = TSEMLP(input_dim, dim // 2, dim)

    def forward(self, tokens: torch.Tensor, ids: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """tokens (B, L, D) projected, ids (B, L), attn (B, L, L) of the last layer -> (B, dim)."""
        b, length = ids.shape
        k = int((attn.size(1) - 2) * self.ratio)
        mask = (ids != 0).to(attn.dtype)
        eot = ids.argmax(dim=-1)
        rows = torch.arange(b, device=ids.device)
        row = attn[rows, eot].clone()  # (B, L): what the end-of-text query attends to
        row[rows, eot] = -1
        row[:, 0] = -1
        row = row * mask
        idx = row.topk(k, dim=-1)[1]
        x = _l2norm(torch.gather(tokens, 1, idx.unsqueeze(-1).expand(-1, -1, tokens.size(2))))
        x = self.linear(x) + self.mlp(x)  # (B, k, dim), most attended first
        # RDE pools the first min(words, k) of them (words: tokens between start and end). At least one
        # is kept: an empty caption (no words) is NaN in RDE's code.
        words = (mask.sum(1) - 2).clamp(min=1, max=k)
        keep = torch.arange(k, device=ids.device)[None, :] < words[:, None]
        return x.masked_fill(~keep[..., None], float("-inf")).max(dim=1)[0]


def _run_blocks(transformer: nn.Module, x: torch.Tensor, attn_mask=None) -> tuple[torch.Tensor, torch.Tensor]:
    """open_clip's (batch-first) transformer over x (B, L, W); also the last block's attention
    weights, averaged over heads (B, L, L)."""
    if not getattr(transformer, "batch_first", True):
        raise TypeError("RDE's token selection needs a batch-first open_clip transformer")
    blocks = list(transformer.resblocks)
    for block in blocks[:-1]:
        x = block(x, attn_mask=attn_mask)
    last = blocks[-1]
    h = last.ln_1(x)
    mask = attn_mask.to(h.dtype) if attn_mask is not None else None
    out, weights = last.attn(h, h, h, need_weights=True, average_attn_weights=True, attn_mask=mask)
    x = x + last.ls_1(out)
    x = x + last.ls_2(last.mlp(last.ln_2(x)))
    return x, weights


def image_tokens_and_attention(clip: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An open_clip ViT: every projected token (B, 1+N, D), CLS first, and the last layer's attention."""
    visual = clip.visual
    x, attn = _run_blocks(visual.transformer, visual._embeds(images))
    x = visual.ln_post(x)
    return (x @ visual.proj if visual.proj is not None else x), attn


def text_tokens_and_attention(clip: nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An open_clip CLIP text tower: every projected token (B, L, D) and the last layer's attention."""
    cast = clip.transformer.get_cast_dtype()
    x = clip.token_embedding(ids).to(cast) + clip.positional_embedding.to(cast)
    x, attn = _run_blocks(clip.transformer, x, clip.attn_mask)
    x = clip.ln_final(x)
    return x @ clip.text_projection, attn


class TokenSelection(nn.Module):
    """The TSE branch of both towers; ``encode_*`` give RDE's combined feature ``[g, t] / sqrt(2)``."""

    def __init__(self, input_dim: int, dim: int = 1024, ratio: float = 0.3):
        super().__init__()
        self.image = VisualTSE(input_dim, dim, ratio)
        self.text = TextualTSE(input_dim, dim, ratio)
        self.dim = dim

    @staticmethod
    def _combine(global_feat: torch.Tensor, tse_feat: torch.Tensor) -> torch.Tensor:
        s = 1.0 / math.sqrt(2.0)
        return torch.cat([F.normalize(global_feat.float(), dim=-1) * s, F.normalize(tse_feat.float(), dim=-1) * s], -1)

    def encode_image(self, clip: nn.Module, images: torch.Tensor) -> torch.Tensor:
        tokens, attn = image_tokens_and_attention(clip, images)
        return self._combine(tokens[:, 0], self.image(tokens, attn))

    def encode_text(self, clip: nn.Module, ids: torch.Tensor) -> torch.Tensor:
        tokens, attn = text_tokens_and_attention(clip, ids)
        rows = torch.arange(ids.size(0), device=ids.device)
        return self._combine(tokens[rows, ids.argmax(dim=-1)], self.text(tokens, ids, attn))
