"""open_clip's ``ModifiedResNet`` (CLIP RN50/RN101) at any input size, and with TextReID's last stride.

open_clip builds the attention pool's positional embedding for a square input only
(``image_size // 32`` cells a side: a (H, W) tuple fails with a ``TypeError``). tbps builds the
tower at its native square size (so pretrained weights load as they are) and then resizes that
embedding to the real grid, as the ViT path resizes its patch positions: the class position is
kept, the s x s grid is interpolated bilinearly to (h, w) (TextReID's ``resize_pos_embed``).

``last_stride=1`` (TextReID's RES5_STRIDE) drops the 2x average pools at the start of layer4 (the
only thing that strides there in CLIP's anti-aliased ResNet), so the final map is H/16 x W/16
(24 x 8 at 384x128) instead of H/32 x W/32; no weight changes shape.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def is_modified_resnet(visual: nn.Module) -> bool:
    return hasattr(visual, "attnpool") and hasattr(visual, "layer4")


def resize_attnpool_embedding(pos: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(1 + s*s, C) -> (1 + h*w, C): class position kept, the s x s grid resized bilinearly."""
    cls_pos, cells = pos[:1], pos[1:]
    s = int(math.isqrt(cells.shape[0]))
    if s * s != cells.shape[0]:
        raise ValueError(f"attention-pool embedding of {cells.shape[0]} cells is not a square grid")
    if (s, s) == tuple(grid):
        return pos.clone()
    g = cells.reshape(1, s, s, -1).permute(0, 3, 1, 2).float()  # (1, C, s, s)
    g = F.interpolate(g, size=tuple(grid), mode="bilinear", align_corners=False)
    g = g.permute(0, 2, 3, 1).reshape(grid[0] * grid[1], -1).to(pos.dtype)
    return torch.cat([cls_pos, g], dim=0)


def adapt_modified_resnet(visual: nn.Module, image_size: tuple[int, int], last_stride: int = 2) -> None:
    """Make a ``ModifiedResNet`` take (H, W) inputs (in place): set layer4's stride, then resize
    the attention pool's positional embedding to the final feature grid."""
    if last_stride not in (1, 2):
        raise ValueError(f"resnet last_stride must be 1 or 2, got {last_stride}")
    if last_stride == 1:
        first = visual.layer4[0]
        first.avgpool = nn.Identity()
        if first.downsample is not None:
            first.downsample[0] = nn.Identity()  # open_clip's downsample is (AvgPool2d, conv, bn)
    ratio = 16 if last_stride == 1 else 32
    h, w = int(image_size[0]), int(image_size[1])
    if h % ratio or w % ratio:
        raise ValueError(f"RN input {h}x{w} must be a multiple of {ratio} (last stride {last_stride})")
    pool = visual.attnpool
    with torch.no_grad():
        pool.positional_embedding = nn.Parameter(resize_attnpool_embedding(pool.positional_embedding.data,
                                                                           (h // ratio, w // ratio)))
    visual.image_size = (h, w)
