"""Build models with open_clip: architecture by name, weights by tag or local path.

The architecture name (``ViT-B-16``) is kept apart from the weights (``openai``, or a
file). What a model is (``ModelSpec``, the architecture registry, CLIP's mean/std) lives
in :mod:`tbps.models.spec`; the text towers in :mod:`tbps.models.text_towers`.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tbps.models.spec import (  # noqa: F401  (CLIP_MEAN .. ModelError: re-exported for callers)
    CLIP_MEAN,
    CLIP_STD,
    ModelError,
    ModelSpec,
    _register_configs,
    arch_config,
    list_architectures,
    register_spec_config,
)
from tbps.models.conv_stem import replace_patch_embedding
from tbps.models.resnet import adapt_modified_resnet
from tbps.models.tbps_model import TBPSModel
from tbps.models.text_towers import text_tower


def create_model(spec: ModelSpec, *, load_pretrained: bool = True) -> TBPSModel:
    """Build a :class:`TBPSModel` from ``spec``.

    With ``load_pretrained=False`` the weights are left random (used when a tbps
    checkpoint is about to be loaded over them; open_clip's random-init warning is then silenced).
    """
    import open_clip

    if spec.arch_config is None:
        spec.arch_config = arch_config(spec.arch)
    else:  # a checkpoint carries its architecture's config: make it buildable anywhere
        register_spec_config(spec)

    if spec.conv_stem and spec.pretrained:
        raise ModelError(f"model.conv_stem replaces {spec.arch}'s patch embedding, so it trains from scratch: "
                         f"set model.pretrained: null (it is {spec.pretrained!r}), or model.conv_stem=null "
                         "to load the weights")
    pretrained = spec.pretrained if load_pretrained else None
    kwargs: dict[str, Any] = {}
    resnet = isinstance(spec.arch_config["vision_cfg"].get("layers"), (list, tuple))  # open_clip's ModifiedResNet
    if spec.image_size is not None and not resnet:
        kwargs["force_image_size"] = tuple(spec.image_size)
    if spec.context_length is not None:
        kwargs["force_context_length"] = spec.context_length
    try:
        with quiet_random_init(not load_pretrained):
            clip = open_clip.create_model(spec.arch, pretrained=pretrained, pretrained_text=False, **kwargs)
    except RuntimeError as e:
        if pretrained and not Path(pretrained).exists():
            raise ModelError(
                f"could not load weights {pretrained!r} for {spec.arch}: {e}. Without internet, download the "
                "weights on a connected machine and pass the file path as --pretrained."
            ) from e
        raise
    if resnet:  # built square at its native size (weights load as they are), then fitted to the real input
        size = spec.image_size or (clip.visual.image_size,) * 2
        adapt_modified_resnet(clip.visual, tuple(size), spec.resnet_last_stride)
    if spec.conv_stem:
        try:
            replace_patch_embedding(clip.visual, spec.conv_stem)
        except ValueError as e:
            raise ModelError(f"{spec.arch}: {e}") from None
    model = TBPSModel(clip, spec)
    if spec.text_attn_dropout:
        model.set_text_attention_dropout(spec.text_attn_dropout)
    if spec.freeze_patch_embed:
        model.freeze_patch_embedding()
    return model


class _DropRandomInitWarning:
    """A logging filter that drops open_clip's "No pretrained weights loaded ... initialized randomly"."""

    @staticmethod
    def filter(record) -> bool:
        return not str(record.msg).startswith("No pretrained weights loaded")


@contextmanager
def quiet_random_init(quiet: bool):
    """Silence open_clip's random-init warning while ``quiet``: the weights of a tbps checkpoint are
    loaded right after (eval, search, index, serve, resume), so the warning would be false."""
    import logging

    if not quiet:
        yield
        return
    root = logging.getLogger()  # open_clip warns through logging.warning, i.e. the root logger
    root.addFilter(_DropRandomInitWarning)
    try:
        yield
    finally:
        root.removeFilter(_DropRandomInitWarning)


def get_tokenizer(spec: ModelSpec):
    """The tokenizer of the spec's text tower, truncating to its context length.

    CLIP's own tower: open_clip's tokenizer of the architecture; ``spec.text_tower`` set: the
    tower's own (the word tokenizer sharing the frozen dictionary, or a WordPiece tokenizer).
    """
    _register_configs()
    return text_tower(spec).tokenizer(spec)
