"""OpenAI's CLIP state-dict layout (also IRRA's and RDE's ``base_model.``, TBPS-CLIP's after renaming, and
open_clip's for its CLIP models): the architecture read from tensor shapes, and the strict load.

Heads are not stored in a state dict: as in OpenAI's ``build_model`` (and IRRA's), every attention layer
has ``width // 64`` heads.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

import torch

from tbps.models.convert.reading import ConvertError


def shape(sd: dict[str, torch.Tensor], key: str, src: str) -> tuple[int, ...]:
    """The shape of ``sd[key]``; a missing tensor is one line naming it."""
    t = sd.get(key)
    if not isinstance(t, torch.Tensor):
        raise ConvertError(f"{src}: missing tensor {key!r}" if t is None else f"{src}: {key!r} is not a tensor")
    return tuple(t.shape)


def _count(sd: dict, prefix: str) -> int:
    return len({k[len(prefix):].split(".")[0] for k in sd if k.startswith(prefix)})


def _text_cfg(sd: dict, src: str) -> dict[str, Any]:
    ctx, width = shape(sd, "positional_embedding", src)
    vocab = shape(sd, "token_embedding.weight", src)[0]
    layers = _count(sd, "transformer.resblocks.")
    if not layers:
        raise ConvertError(f"{src}: missing tensor 'transformer.resblocks.0.attn.in_proj_weight' (no text layers)")
    return {"context_length": ctx, "vocab_size": vocab, "width": width, "heads": max(1, width // 64), "layers": layers}


def _vit_cfg(sd: dict, src: str, image_size: tuple[int, int] | None) -> dict[str, Any]:
    width, _, patch, patch_w = shape(sd, "visual.conv1.weight", src)
    if patch != patch_w:
        raise ConvertError(f"{src}: visual.conv1.weight has a non-square {patch}x{patch_w} patch")
    positions = shape(sd, "visual.positional_embedding", src)[0] - 1
    if image_size is None:
        grid = math.isqrt(positions)
        if grid * grid != positions:
            raise ConvertError(f"{src}: visual.positional_embedding holds {positions} patches, not a square grid: "
                               "give the input size (--image-size H W)")
        image_size = (grid * patch, grid * patch)
    h, w = image_size
    if (h // patch) * (w // patch) != positions or h % patch or w % patch:
        raise ConvertError(f"{src}: visual.positional_embedding holds {positions} patches, which a {h}x{w} input "
                           f"with {patch}-pixel patches and stride {patch} does not give ({h // patch}x{w // patch}); "
                           "another --image-size, or an overlapping stride, which tbps does not support")
    layers = _count(sd, "visual.transformer.resblocks.")
    return {"image_size": [h, w], "layers": layers, "width": width, "patch_size": patch, "head_width": 64}


def _resnet_cfg(sd: dict, src: str) -> dict[str, Any]:
    layers = [_count(sd, f"visual.layer{i}.") for i in (1, 2, 3, 4)]
    width = shape(sd, "visual.layer1.0.conv1.weight", src)[1]
    cells = shape(sd, "visual.attnpool.positional_embedding", src)[0] - 1
    grid = math.isqrt(cells)
    if grid * grid != cells:
        raise ConvertError(f"{src}: visual.attnpool.positional_embedding holds {cells} cells, not a square grid")
    return {"image_size": grid * 32, "layers": layers, "width": width, "patch_size": None, "head_width": 64}


def infer_config(sd: dict[str, torch.Tensor], src: str, *, image_size=None, quick_gelu: bool = True) -> dict:
    """The open_clip model config of an OpenAI-layout state dict."""
    embed_dim = shape(sd, "text_projection", src)[1]
    if "visual.conv1.weight" in sd and "visual.proj" in sd:
        vision = _vit_cfg(sd, src, tuple(image_size) if image_size else None)
    elif "visual.attnpool.positional_embedding" in sd:
        if image_size:
            raise ConvertError(f"{src}: --image-size is for ViT checkpoints; a ResNet's size is its attention pool's")
        vision = _resnet_cfg(sd, src)
    else:
        raise ConvertError(f"{src}: missing tensor 'visual.conv1.weight' / 'visual.proj' (neither a CLIP ViT "
                           "nor a CLIP ResNet)")
    return {"embed_dim": embed_dim, "vision_cfg": vision, "text_cfg": _text_cfg(sd, src), "quick_gelu": quick_gelu}


def arch_name(fmt: str, cfg: dict) -> str:
    """A name that identifies the config (open_clip's registry is keyed by name)."""
    v = cfg["vision_cfg"]
    kind = f"vit-w{v['width']}-l{v['layers']}-p{v['patch_size']}" if v.get("patch_size") else f"rn-w{v['width']}"
    digest = hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:8]
    return f"{fmt}-{kind}-{digest}"


def load_strict(model: torch.nn.Module, sd: dict[str, torch.Tensor], src: str) -> None:
    """Load ``sd`` into ``model`` only if every key and shape fits; else one line naming the first misfit
    (nothing is loaded)."""
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    for what, keys in (("missing tensor", missing), ("unexpected key", unexpected)):
        if keys:
            more = f" (and {len(keys) - 1} more)" if len(keys) > 1 else ""
            raise ConvertError(f"{src}: {what} {keys[0]!r}{more}")
    for k, v in sd.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise ConvertError(f"{src}: tensor {k!r} has shape {tuple(v.shape)}, the architecture read from the "
                               f"file needs {tuple(own[k].shape)}")
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in sd.items()}, strict=True)
