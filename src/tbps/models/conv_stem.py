"""A convolutional stem in place of a ViT's patch embedding ("early convolutions", Xiao et al. 2021).

open_clip's ViT cuts the image into p x p patches with one strided convolution (``visual.conv1``,
kernel = stride = p). ``model.conv_stem: [c1, ..., ck]`` replaces it with k 3x3 convolutions of stride
2 (channels c1 .. ck, each followed by a GELU) and a 1x1 convolution to the tower's width, so that
2**k = p and the token grid, the positional embedding and everything after ``conv1`` stay as they
are. The tokens are normalised by the tower's own ``ln_pre`` right after, so the stem has no norm
layer of its own (nothing that depends on the batch, no buffers to average or synchronise).

Only for towers trained from scratch: no released weights have such a stem.
"""

from __future__ import annotations

from typing import Sequence

from torch import nn


class ConvStem(nn.Sequential):
    """(B, 3, H, W) -> (B, width, H / 2**k, W / 2**k): k stride-2 3x3 convolutions + GELU, then 1x1."""

    def __init__(self, channels: Sequence[int], width: int):
        layers: list[nn.Module] = []
        c_in = 3
        for c in channels:
            layers += [nn.Conv2d(c_in, c, kernel_size=3, stride=2, padding=1, bias=False), nn.GELU()]
            c_in = c
        layers.append(nn.Conv2d(c_in, width, kernel_size=1, bias=False))
        super().__init__(*layers)


MAX_CHANNELS = 4096  # a checkpoint's spec is untrusted: no layer it names may be absurdly large
MAX_CONVS = 8  # 256-pixel patches: more stride-2 convolutions than any ViT's patch size needs


def is_channel_list(channels: object) -> bool:
    """Whether ``channels`` (from a recipe or an untrusted checkpoint's spec) is a list a stem can be built
    from: 1 to MAX_CONVS channel counts, each 1 to MAX_CHANNELS."""
    return (isinstance(channels, (list, tuple)) and 0 < len(channels) <= MAX_CONVS
            and all(isinstance(c, int) and not isinstance(c, bool) and 0 < c <= MAX_CHANNELS for c in channels))


def check_conv_stem(channels: Sequence[int], patch_size) -> None:
    """A ``ValueError`` naming the problem when ``channels`` cannot replace a ``patch_size`` embedding."""
    if not is_channel_list(channels):
        raise ValueError(f"model.conv_stem {channels!r}: a list of channel counts (1 to {MAX_CHANNELS}), one per "
                         f"stride-2 convolution, at most {MAX_CONVS} of them")
    patch = patch_size if isinstance(patch_size, (list, tuple)) else (patch_size, patch_size)
    if any(p != 2 ** len(channels) for p in patch):
        raise ValueError(f"model.conv_stem has {len(channels)} stride-2 convolutions ({2 ** len(channels)}-pixel "
                         f"cells) but the architecture's patches are {patch_size} pixels: give log2(patch) channel "
                         "counts, or model.conv_stem=null for its own patch embedding")


def replace_patch_embedding(visual: nn.Module, channels: Sequence[int]) -> None:
    """Swap open_clip ViT ``visual.conv1`` for a :class:`ConvStem` of the same output width."""
    conv1 = getattr(visual, "conv1", None)
    if not isinstance(conv1, nn.Conv2d) or not hasattr(visual, "positional_embedding"):
        raise ValueError("model.conv_stem needs a ViT vision tower (open_clip's patch embedding `conv1`)")
    check_conv_stem(channels, conv1.kernel_size)
    visual.conv1 = ConvStem(channels, conv1.out_channels)
