"""What a model is, as data: ``ModelSpec``, the architecture registry and CLIP's pixel statistics.

The ground of the package: it imports nothing of tbps, so every layer may describe a model
without building one. Tiny CPU architectures are JSON configs in ``model_configs/`` beside
this file and are added to open_clip's registry on first use; paper architectures come from
open_clip by name.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

CONFIG_DIR = Path(__file__).parent / "model_configs"
PAPER_ARCHITECTURES = ("ViT-B-16", "RN50", "RN101", "EVA02-B-16")

_registered = False


class ModelError(ValueError):
    """A model cannot be built as asked (unknown architecture, weights that cannot be had)."""

    user_error = True


@dataclass
class ModelSpec:
    """Everything needed to rebuild a model; stored in every checkpoint.

    ``image_size`` is (height, width); ``None`` keeps the architecture's own size.
    ``pretrained`` is an open_clip tag (``openai``, needs internet once) or a local file.
    """

    arch: str = "tiny-vit"
    pretrained: str | None = None
    image_size: tuple[int, int] | None = None
    context_length: int | None = None
    text_attn_dropout: float = 0.0
    freeze_patch_embed: bool = False
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    arch_config: dict[str, Any] | None = field(default=None, repr=False)
    # Another text tower than CLIP's own (None), keyed by "type" (see text_towers.py): TextReID's frozen
    # word dictionary + BiGRU ({"type": "frozen-words", "source": "minilm"|"clip"|"random", "hidden": 512},
    # the default type) or a BERT-family tower ({"type": "hf", "path": "minilm"}).
    text_tower: dict[str, Any] | None = None
    # Linear heads to this embedding size on both towers (TextReID: 256); None keeps the architecture's.
    embed_dim: int | None = None
    # How the source codebase of a converted model (``tbps convert``) prepared its inputs; None: tbps's own
    # (squash-resize bicubic, TBPS-CLIP caption cleaning). Keys: ``source``, ``resize`` ("squash" |
    # "shortest"), ``interpolation``, ``caption_cleaning`` ("tbps-clip" | "none"), ``max_words``,
    # ``tokenizer``, ``truncate``. The encoder (retrieval/encoder.py) honours resize, interpolation,
    # caption_cleaning and max_words; every key is part of an index's fingerprint.
    preprocess: dict[str, Any] | None = None
    # RDE's token-selection embedding branch ({"ratio": 0.3, "dim": 1024}, models/rde.py): features are
    # the global and the TSE embedding, each L2-normalised and scaled by 1/sqrt(2), concatenated.
    tse: dict[str, Any] | None = None
    # ViTs trained from scratch only: 3x3 stride-2 convolutions of these channels (then a 1x1 to the width)
    # in place of the patch embedding, log2(patch size) of them (models/conv_stem.py); None: open_clip's own.
    conv_stem: list[int] | None = None
    # CLIP ResNets only: stride of layer4 (2: CLIP's own; 1: TextReID's RES5_STRIDE, a H/16 x W/16 final map).
    resnet_last_stride: int = 2

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelSpec":
        """The spec of a dict (a recipe's ``model:`` section, a checkpoint's ``model_spec``)."""
        d = dict(d)
        for key in ("image_size", "mean", "std"):
            if d.get(key) is not None:
                d[key] = tuple(d[key])
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ModelError(f"unknown model option(s) {sorted(unknown)}; known: {sorted(cls.__dataclass_fields__)}")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        """A plain dict (lists, not tuples) that :meth:`from_dict` reads back."""
        return {k: (list(v) if isinstance(v, tuple) else copy.deepcopy(v)) for k, v in self.__dict__.items()}


def _register_configs() -> None:
    global _registered
    if not _registered:
        import open_clip

        open_clip.add_model_config(CONFIG_DIR)
        _registered = True


def register_spec_config(spec: ModelSpec) -> None:
    """Make ``spec.arch`` known to open_clip, from the config a checkpoint carries if need be."""
    _register_configs()
    import open_clip

    if spec.arch_config is not None and open_clip.get_model_config(spec.arch) is None:
        open_clip.factory._MODEL_CONFIGS[spec.arch] = copy.deepcopy(spec.arch_config)


def list_architectures() -> dict[str, list[str]]:
    """Tiny CPU architectures shipped with tbps and the paper architectures from open_clip."""
    return {"tiny": sorted(p.stem for p in CONFIG_DIR.glob("*.json")), "paper": list(PAPER_ARCHITECTURES)}


def arch_config(arch: str) -> dict[str, Any]:
    """The open_clip config dict of an architecture name."""
    _register_configs()
    import open_clip

    cfg = open_clip.get_model_config(arch)
    if cfg is None:
        archs = list_architectures()
        raise ModelError(
            f"unknown architecture {arch!r}: tiny ones are {archs['tiny']}, paper ones {archs['paper']} "
            "(any open_clip model name also works)"
        )
    return copy.deepcopy(cfg)


def text_context_length(spec: ModelSpec) -> int:
    """Tokens per caption: the spec's own ``context_length`` or its architecture's."""
    return int(spec.context_length or (spec.arch_config or arch_config(spec.arch))["text_cfg"]["context_length"])


def check_image_size(spec: ModelSpec) -> None:
    """A :class:`ModelError` when ``spec.image_size`` is smaller than one patch of its vision tower
    (a ViT's ``patch_size``; 32 pixels for a CLIP ResNet, which downsamples 32x), so that the
    mistake is named before any work instead of failing in the first convolution."""
    vision = (spec.arch_config or arch_config(spec.arch)).get("vision_cfg", {})  # unknown arch: ModelError
    if spec.image_size is None:
        return
    if isinstance(vision.get("layers"), (list, tuple)):
        least = 32
    else:
        patch = vision.get("patch_size")
        least = max(patch) if isinstance(patch, (list, tuple)) else patch
    if least and min(spec.image_size) < least:
        raise ModelError(f"model.image_size {list(spec.image_size)} is smaller than one {least}-pixel patch of "
                         f"{spec.arch}: use at least [{least}, {least}]")
