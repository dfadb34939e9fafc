"""The text towers a model may use, one registry entry per ``model.text_tower.type``.

Each entry knows how to build its tower for a :class:`ModelSpec`, which tokenizer turns
captions into its ids, and what it does with the training vocabulary before training:

- ``text_tower: null``: CLIP's own text transformer (inside the open_clip model, so nothing
  is built here), open_clip's BPE tokenizer (its words memoised: ``clip_bpe.py``), no vocabulary step;
- ``frozen-words`` (the default type): TextReID's frozen word dictionary + BiGRU
  (``text_stream.py``), its word tokenizer, and the vocabulary encoded once into the dictionary
  and recorded in the spec (unseen query words are then read through it: ``word_map.py``);
- ``hf``: a BERT-family tower from a local folder (``hf_text.py``), its WordPiece tokenizer,
  no vocabulary step (its subword vocabulary is fixed).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from tbps.models.hf_text import HFTextTower, HFTokenizer
from tbps.models.spec import ModelError, ModelSpec, register_spec_config, text_context_length
from tbps.models.text_stream import (
    FrozenWordStream,
    build_text_stream,
    get_word_tokenizer,
    record_vocabulary,
    split_words,
)


@dataclass(frozen=True)
class TextTower:
    """One kind of text tower.

    ``build(spec, out_dim)`` -> the module (None: CLIP's own tower, already in the open_clip model);
    ``tokenizer(spec)`` -> captions to (B, L) ids; ``prepare(spec, tower, captions)`` -> ``{"words": N,
    "cached": bool, ...}`` after taking in the training captions, each a list of words (None: no
    vocabulary step), with ``split_words(caption)`` -> the words as the tower stores them.
    """

    build: Callable[[ModelSpec, int], nn.Module] | None
    tokenizer: Callable[[ModelSpec], Callable]
    prepare: Callable[[ModelSpec, nn.Module, list[list[str]]], dict[str, Any]] | None = None
    split_words: Callable[[str], list[str]] | None = None


def _clip_tokenizer(spec: ModelSpec):
    """open_clip's tokenizer of the architecture, its BPE words memoised (the same ids: ``clip_bpe.py``)."""
    import open_clip

    from tbps.models.clip_bpe import memoize

    register_spec_config(spec)
    return memoize(open_clip.get_tokenizer(spec.arch, context_length=spec.context_length))


def _prepare_frozen_words(spec: ModelSpec, stream: FrozenWordStream, captions: list[list[str]]) -> dict[str, Any]:
    """Encode the training words into the dictionary and record them, and their adjacent pairs, in the
    spec (for ``oov``)."""
    record_vocabulary(spec, captions)
    return stream.prepare_vocabulary(spec.text_tower["vocabulary"])  # the words, as recorded


CLIP_TOWER = TextTower(build=None, tokenizer=_clip_tokenizer)

TEXT_TOWERS: dict[str, TextTower] = {
    "frozen-words": TextTower(
        build=build_text_stream,
        tokenizer=lambda spec: get_word_tokenizer(spec, text_context_length(spec)),
        prepare=_prepare_frozen_words,
        split_words=split_words,
    ),
    "hf": TextTower(
        build=HFTextTower,
        tokenizer=lambda spec: HFTokenizer(spec.text_tower.get("path", "minilm"), text_context_length(spec)),
    ),
}
DEFAULT_TYPE = "frozen-words"  # a text_tower without "type" (TextReID recipes predate the key)


def text_tower(spec: ModelSpec) -> TextTower:
    """The registry entry of ``spec.text_tower`` (CLIP's own tower when it is unset)."""
    if not spec.text_tower:
        return CLIP_TOWER
    kind = spec.text_tower.get("type", DEFAULT_TYPE)
    entry = TEXT_TOWERS.get(kind)
    if entry is None:
        raise ModelError(
            f"model.text_tower.type {kind!r}: known types are {sorted(TEXT_TOWERS)} "
            "(or text_tower: null for CLIP's own text transformer)"
        )
    return entry
