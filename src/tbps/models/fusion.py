"""Cross-modal fusion encoder: text tokens attend to image tokens (ALBEF / IRRA style).

Shared by IRRA (masked language modelling through the fusion encoder) and LAIP (image-text
matching, fusion triplet, BidirAtt, mask phrase modelling) and by top-k re-scoring at
inference. Each layer is pre-norm: self-attention over the text tokens (padding masked),
cross-attention from text to image tokens, then an MLP. Inputs are the dual encoders'
projected token outputs (D-dim), mapped to the fusion width W here.

The cross-attention probabilities of every layer are returned (B, H, L, N) and stay in
the autograd graph, so BidirAtt can take the gradient of a prediction with respect to
them (Grad-CAM's "backward attention"). ``attn_override`` replaces a layer's probabilities
by a given tensor, which makes that gradient checkable by finite differences.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class FusionOutput:
    hidden: torch.Tensor  # (B, L, W) fused text-token states after the final norm
    cross_attn: list[torch.Tensor] = field(default_factory=list)  # per layer (B, H, L, N), rows sum to 1


class Attention(nn.Module):
    """Multi-head attention that returns its probability map (B, H, Lq, Lk)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"fusion width {width} is not divisible by {heads} heads")
        self.heads, self.head_dim = heads, width // heads
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(width, 2 * width)
        self.out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor, ctx_mask: torch.Tensor | None = None,
                override: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, Lq, W) queries, ctx (B, Lk, W) keys/values, ctx_mask (B, Lk) True = attend."""
        b, lq, w = x.shape
        lk = ctx.shape[1]
        q = self.q(x).view(b, lq, self.heads, self.head_dim).transpose(1, 2)  # (B, H, Lq, d)
        k, v = self.kv(ctx).view(b, lk, 2, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (B, H, Lk, d) each
        scores = q @ k.transpose(-1, -2) / self.head_dim**0.5  # (B, H, Lq, Lk)
        if ctx_mask is not None:
            scores = scores.masked_fill(~ctx_mask[:, None, None, :], float("-inf"))
        probs = scores.softmax(dim=-1) if override is None else override
        out = (probs @ v).transpose(1, 2).reshape(b, lq, w)
        return self.out(out), probs


class FusionLayer(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.ln_self, self.ln_cross, self.ln_mlp = nn.LayerNorm(width), nn.LayerNorm(width), nn.LayerNorm(width)
        self.self_attn = Attention(width, heads)
        self.cross_attn = Attention(width, heads)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))

    def forward(self, x, text_mask, image, image_mask, override=None):
        h = self.ln_self(x)
        x = x + self.self_attn(h, h, text_mask)[0]
        y, probs = self.cross_attn(self.ln_cross(x), image, image_mask, override)
        x = x + y
        return x + self.mlp(self.ln_mlp(x)), probs


class FusionEncoder(nn.Module):
    """Text-to-image cross-attention encoder with an ITM head and a masked-token head.

    ``embed_dim`` D is the dual encoders' token dimension; ``width`` W the fusion width;
    ``vocab_size`` the tokenizer's vocabulary (the masked-token head predicts over it).
    """

    def __init__(self, embed_dim: int, *, width: int = 512, layers: int = 4, heads: int = 8,
                 mlp_ratio: float = 4.0, vocab_size: int = 49408):
        super().__init__()
        self.config = {"embed_dim": embed_dim, "width": width, "layers": layers, "heads": heads,
                       "mlp_ratio": mlp_ratio, "vocab_size": vocab_size}
        self.text_in = nn.Linear(embed_dim, width)
        self.image_in = nn.Linear(embed_dim, width)
        self.ln_image = nn.LayerNorm(width)
        self.layers = nn.ModuleList(FusionLayer(width, heads, mlp_ratio) for _ in range(layers))
        self.ln_final = nn.LayerNorm(width)
        self.itm_head = nn.Linear(width, 2)  # [no match, match] logits on the first text token
        self.mlm_head = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.LayerNorm(width),
                                      nn.Linear(width, vocab_size))

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def forward(self, text: torch.Tensor, text_mask: torch.Tensor, image: torch.Tensor,
                image_mask: torch.Tensor | None = None,
                attn_override: dict[int, torch.Tensor] | None = None) -> FusionOutput:
        """text (B, L, D) token features with text_mask (B, L) True on real tokens; image (B, N, D)
        image tokens (global first, then patches, as :func:`image_memory` builds them)."""
        x = self.text_in(text)
        mem = self.ln_image(self.image_in(image))
        attn = []
        for i, layer in enumerate(self.layers):
            x, probs = layer(x, text_mask, mem, image_mask, (attn_override or {}).get(i))
            attn.append(probs)
        return FusionOutput(self.ln_final(x), attn)

    def itm_logits(self, out: FusionOutput) -> torch.Tensor:
        """(B, 2) match logits from the first text token's fused state."""
        return self.itm_head(out.hidden[:, 0])

    def itm_score(self, out: FusionOutput) -> torch.Tensor:
        """(B,) probability that the pair matches."""
        return self.itm_logits(out).softmax(dim=-1)[:, 1]

    def mlm_logits(self, out: FusionOutput, positions: torch.Tensor,
                   support: torch.Tensor | None = None) -> torch.Tensor:
        """positions (B, L) bool -> (M, V) vocabulary logits of the M selected tokens (row-major order).

        ``support`` (S,) token ids: only those rows of the output layer are computed, (M, S), in that
        order: a softmax over the S tokens instead of all V (the head's last layer costs M x W x V)."""
        hidden = out.hidden[positions]
        if support is None:
            return self.mlm_head(hidden)
        last = self.mlm_head[-1]
        return F.linear(self.mlm_head[:-1](hidden), last.weight[support], last.bias[support])


def image_memory(model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 3, H, W) -> (global (B, D), memory (B, 1+N, D)): the global feature, then the patch tokens."""
    pooled, patches = model.image_tokens(images)
    return pooled, torch.cat([pooled[:, None], patches], dim=1)


def build_fusion(model: nn.Module, cfg: dict) -> FusionEncoder:
    """A fusion encoder sized by a recipe's ``fusion:`` section for ``model``'s token dimension."""
    from tbps.models.factory import get_tokenizer

    tok = get_tokenizer(model.spec)
    vocab = int(getattr(tok, "vocab_size", 49408))
    return FusionEncoder(model.embed_dim, width=cfg["width"], layers=cfg["layers"], heads=cfg["heads"],
                         mlp_ratio=cfg["mlp_ratio"], vocab_size=vocab)


def cross_entropy_or_zero(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy; 0 (still in the graph) when there is nothing to predict."""
    if labels.numel() == 0:
        return logits.sum() * 0.0
    return F.cross_entropy(logits, labels)
