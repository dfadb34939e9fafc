"""Build models with open_clip: architecture by name, weights by tag or local path.

The architecture name (``ViT-B-16``) is kept apart from the weights (``openai``, or a
file). Tiny CPU architectures are JSON configs in ``model_configs/`` and are added to
open_clip's registry on first use.
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
    # TextReID: replace the CLIP text tower by a frozen word dictionary + BiGRU
    # ({"type": "frozen-words", "source": "minilm"|"clip"|"random", "hidden": 512}; see text_stream.py).
    text_tower: dict[str, Any] | None = None
    # Linear heads to this embedding size on both towers (TextReID: 256); None keeps the architecture's.
    embed_dim: int | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelSpec":
        d = dict(d)
        for key in ("image_size", "mean", "std"):
            if d.get(key) is not None:
                d[key] = tuple(d[key])
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ModelError(f"unknown model option(s) {sorted(unknown)}; known: {sorted(cls.__dataclass_fields__)}")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else copy.deepcopy(v)) for k, v in self.__dict__.items()}


def _register_configs() -> None:
    global _registered
    if not _registered:
        import open_clip

        open_clip.add_model_config(CONFIG_DIR)
        _registered = True


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


def create_model(spec: ModelSpec, *, load_pretrained: bool = True):
    """Build a :class:`TBPSModel` from ``spec``.

    With ``load_pretrained=False`` the weights are left random (used when a tbps
    checkpoint is about to be loaded over them).
    """
    _register_configs()
    import open_clip

    from tbps.models.tbps_model import TBPSModel

    if spec.arch_config is None:
        spec.arch_config = arch_config(spec.arch)
    elif open_clip.get_model_config(spec.arch) is None:
        # A checkpoint carries its architecture's config: make it buildable anywhere.
        open_clip.factory._MODEL_CONFIGS[spec.arch] = copy.deepcopy(spec.arch_config)

    pretrained = spec.pretrained if load_pretrained else None
    kwargs: dict[str, Any] = {}
    if spec.image_size is not None:
        kwargs["force_image_size"] = tuple(spec.image_size)
    if spec.context_length is not None:
        kwargs["force_context_length"] = spec.context_length
    try:
        clip = open_clip.create_model(spec.arch, pretrained=pretrained, pretrained_text=False, **kwargs)
    except RuntimeError as e:
        if pretrained and not Path(pretrained).exists():
            raise ModelError(
                f"could not load weights {pretrained!r} for {spec.arch}: {e}. Without internet, download the "
                "weights on a connected machine and pass the file path as --pretrained."
            ) from e
        raise
    model = TBPSModel(clip, spec)
    if spec.text_attn_dropout:
        model.set_text_attention_dropout(spec.text_attn_dropout)
    if spec.freeze_patch_embed:
        model.freeze_patch_embedding()
    return model


def get_tokenizer(spec: ModelSpec):
    """The open_clip tokenizer of the architecture, truncating to its context length.

    With ``spec.text_tower`` set: the word tokenizer sharing the frozen dictionary.
    """
    _register_configs()
    import open_clip

    if spec.text_tower:
        from tbps.models.text_stream import get_word_tokenizer

        length = spec.context_length or (spec.arch_config or arch_config(spec.arch))["text_cfg"]["context_length"]
        if spec.text_tower.get("type") == "hf":  # WordPiece tokenizer of a BERT-family tower (hf_text.py)
            from tbps.models.hf_text import HFTokenizer

            return HFTokenizer(spec.text_tower.get("path", "minilm"), length)
        return get_word_tokenizer(spec, length)

    if spec.arch_config is not None and open_clip.get_model_config(spec.arch) is None:
        open_clip.factory._MODEL_CONFIGS[spec.arch] = copy.deepcopy(spec.arch_config)
    return open_clip.get_tokenizer(spec.arch, context_length=spec.context_length)
