"""The released formats ``tbps convert`` reads: each maps its source's keys onto a tbps model (open_clip's
layout under ``clip.``), checks every key and shape, and records how its source code preprocessed inputs.

Each reader returns ``(state dict for TBPSModel, ModelSpec fields)``; :func:`build` loads it strictly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from tbps.models.convert.clip_layout import arch_name, infer_config, load_strict, shape
from tbps.models.convert.reading import ConvertError, read_source
from tbps.models.factory import quiet_random_init
from tbps.models.spec import CLIP_MEAN, CLIP_STD, ModelSpec

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# IRRA's training-only modules (ID classifier, MLM's cross-modal transformer and head): never used at inference.
IRRA_UNUSED = ("classifier.", "cross_attn.", "cross_modal_transformer.", "ln_pre_t.", "ln_pre_i.", "ln_post.",
               "mlm_head.")
# TBPS-CLIP's training-only modules (SimCLR MLP of SS, and the optional ID/MLM heads).
TBPS_CLIP_UNUSED = ("simclr_mlp.",) + IRRA_UNUSED
# Tensors OpenAI's TorchScript files carry besides the weights.
OPENAI_EXTRA = ("input_resolution", "context_length", "vocab_size")


CLIP_BPE = "CLIP BPE (ftfy, html unescape, whitespace, lower-case)"


def _preprocess(source: str, resize: str, caption_cleaning: str, max_words: int | None,
                interpolation: str = "bicubic", tokenizer: str = CLIP_BPE,
                truncate: str = "first context_length tokens, the last one replaced by end-of-text") -> dict[str, Any]:
    return {"source": source, "resize": resize, "interpolation": interpolation, "caption_cleaning": caption_cleaning,
            "max_words": max_words, "tokenizer": tokenizer, "truncate": truncate}


@dataclass
class Converted:
    state: dict[str, torch.Tensor]  # TBPSModel's state dict
    spec: ModelSpec


def _unwrap(obj: Any, src: str, keys: tuple[str, ...] = ("model", "state_dict")) -> dict[str, torch.Tensor]:
    for key in keys:
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj:
        raise ConvertError(f"{src}: no state dict found (expected a dict of tensors, or one under 'model')")
    bad = next((k for k, v in obj.items() if not isinstance(v, torch.Tensor)), None)
    if bad is not None:
        raise ConvertError(f"{src}: {bad!r} is not a tensor (not a state dict)")
    return {str(k): (v.float() if v.is_floating_point() else v) for k, v in obj.items()}


def _split(sd: dict, src: str, prefix: str, unused: tuple[str, ...], extra: dict[str, str] | None = None):
    """``prefix``-keys (prefix removed), plus ``extra`` prefixes renamed; other keys must be known-unused."""
    main, renamed = {}, {}
    if not any(k.startswith(prefix) for k in sd):
        raise ConvertError(f"{src}: no tensor under {prefix!r} (missing tensor '{prefix}visual.conv1.weight')")
    for k, v in sd.items():
        if k.startswith(prefix):
            main[k[len(prefix):]] = v
        elif extra and any(k.startswith(p) for p in extra):
            p = next(p for p in extra if k.startswith(p))
            renamed[extra[p] + k[len(p):]] = v
        elif not any(k.startswith(u) for u in unused):
            raise ConvertError(f"{src}: unexpected key {k!r}")
    return main, renamed


def _clip_spec(fmt: str, clip_sd: dict, src: str, preprocess: dict, mean, std, *, image_size=None,
               tse: dict | None = None) -> ModelSpec:
    cfg = infer_config(clip_sd, src, image_size=image_size, quick_gelu=True)
    return ModelSpec(arch=arch_name(fmt, cfg), arch_config=cfg, mean=tuple(mean), std=tuple(std),
                     preprocess=preprocess, tse=tse)


def _with_logit_scale(clip_sd: dict, temperature: float) -> dict:
    if "logit_scale" not in clip_sd:  # IRRA/RDE fix the temperature outside the CLIP (0.02)
        clip_sd = {**clip_sd, "logit_scale": torch.tensor(math.log(1.0 / temperature))}
    return clip_sd


def read_irra(src: str, *, image_size=(384, 128), **_) -> Converted:
    sd = _unwrap(read_source(src), src)
    clip_sd, _ = _split(sd, src, "base_model.", IRRA_UNUSED)
    clip_sd = _with_logit_scale(clip_sd, 0.02)
    pre = _preprocess("irra", "squash", "none", None)
    spec = _clip_spec("irra", clip_sd, src, pre, CLIP_MEAN, CLIP_STD, image_size=image_size)
    return Converted({f"clip.{k}": v for k, v in clip_sd.items()}, spec)


def read_rde(src: str, *, image_size=(384, 128), select_ratio: float = 0.3, **_) -> Converted:
    sd = _unwrap(read_source(src), src)
    clip_sd, tse_sd = _split(sd, src, "base_model.", IRRA_UNUSED,
                             {"visul_emb_layer.": "tse.image.", "texual_emb_layer.": "tse.text.", })
    if not tse_sd:
        raise ConvertError(f"{src}: missing tensor 'texual_emb_layer.linear.weight' (no TSE layers: an IRRA "
                           "checkpoint? use `tbps convert irra`)")
    if not 0 < select_ratio <= 1:
        raise ConvertError(f"--select-ratio must be in (0, 1], got {select_ratio}")
    dim = shape(tse_sd, "tse.text.linear.weight", src)[0]
    clip_sd = _with_logit_scale(clip_sd, 0.02)
    pre = _preprocess("rde", "squash", "none", None)
    spec = _clip_spec("rde", clip_sd, src, pre, CLIP_MEAN, CLIP_STD, image_size=image_size,
                      tse={"dim": int(dim), "ratio": float(select_ratio)})
    return Converted({**{f"clip.{k}": v for k, v in clip_sd.items()}, **tse_sd}, spec)


def read_tbps_clip(src: str, **_) -> Converted:
    sd = _unwrap(read_source(src), src)
    visual, text = _split(sd, src, "visual.", TBPS_CLIP_UNUSED + ("logit_scale",), {"encode_text.": ""})
    clip_sd = {**{f"visual.{k}": v for k, v in visual.items()}, **text}
    clip_sd["logit_scale"] = sd.get("logit_scale", torch.tensor(math.log(1 / 0.07)))
    pre = _preprocess("tbps-clip", "squash", "tbps-clip", 77,
                      tokenizer="CLIP BPE (TBPS-CLIP's copy: the same ids, '<|mask|>' replaces the last merge)",
                      truncate="start token, the first context_length - 2 tokens, end-of-text")
    spec = _clip_spec("tbps-clip", clip_sd, src, pre, IMAGENET_MEAN, IMAGENET_STD)
    return Converted({f"clip.{k}": v for k, v in clip_sd.items()}, spec)


def read_openai(src: str, **_) -> Converted:
    sd = _unwrap(read_source(src), src)
    clip_sd = {k: v for k, v in sd.items() if k not in OPENAI_EXTRA and not k.endswith("attn_mask")}
    pre = _preprocess("openai", "shortest", "none", None)
    spec = _clip_spec("openai", clip_sd, src, pre, CLIP_MEAN, CLIP_STD)
    return Converted({f"clip.{k}": v for k, v in clip_sd.items()}, spec)


def read_open_clip(src: str, *, arch: str | None = None, **_) -> Converted:
    import open_clip

    from tbps.models.spec import arch_config

    if not arch:
        raise ConvertError("open_clip: give the architecture (--arch ViT-B-16, see open_clip.list_models())")
    cfg = arch_config(arch)
    if Path(src).expanduser().is_file():
        sd = _unwrap(read_source(str(Path(src).expanduser())), src)
        sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}
        with quiet_random_init(True):  # the file's weights are loaded right after
            model = open_clip.create_model(arch, pretrained=None)
        source = "file"
    else:  # a pretrained tag: open_clip's own download (needs internet once)
        pcfg = open_clip.get_pretrained_cfg(arch, src) or {}
        if not pcfg:
            raise ConvertError(f"open_clip: {src!r} is neither a file nor a pretrained tag of {arch} "
                               f"(tags: {open_clip.list_pretrained_tags_by_model(arch)})")
        if pcfg.get("quick_gelu"):
            cfg["quick_gelu"] = True
        try:
            model = open_clip.create_model(arch, pretrained=src, force_quick_gelu=bool(pcfg.get("quick_gelu")))
        except Exception as e:
            raise ConvertError(f"open_clip: cannot get the weights {arch}/{src} ({type(e).__name__}: {e}); "
                               "without internet, download them on a connected machine and pass the file") from None
        sd, source = model.state_dict(), "tag"
    p = open_clip.get_model_preprocess_cfg(model)
    resize = {"shortest": "shortest", "squash": "squash"}.get(p.get("resize_mode", "shortest"))
    if resize is None:
        raise ConvertError(f"open_clip: {arch} preprocesses with resize mode {p.get('resize_mode')!r}, which tbps "
                           "does not implement (shortest, squash)")
    pre = _preprocess(f"open_clip ({source})", resize, "none", None, interpolation=p.get("interpolation", "bicubic"),
                      tokenizer=f"open_clip's tokenizer of {arch}")
    spec = ModelSpec(arch=arch_name("open_clip", cfg), arch_config=cfg, mean=tuple(p["mean"]), std=tuple(p["std"]),
                     preprocess=pre)
    return Converted({f"clip.{k}": v for k, v in sd.items()}, spec)


READERS: dict[str, Callable[..., Converted]] = {
    "irra": read_irra, "rde": read_rde, "tbps-clip": read_tbps_clip, "openai": read_openai,
    "open_clip": read_open_clip,
}


def build(converted: Converted, src: str):
    """The TBPSModel of a converted state, loaded strictly (eval mode)."""
    from tbps.models.factory import create_model

    model = create_model(converted.spec, load_pretrained=False)
    load_strict(model, converted.state, src)
    return model.eval()
