"""An objective's encoder calls, run on a chunk of the batch or answered from their cached outputs.

Gradient caching (:mod:`tbps.engine.gradcache`) needs an objective in two halves: the per-sample
encoder calls (run chunk by chunk) and the losses over the whole batch's features. Objectives
declare their encoder calls as a list of :class:`Embedding`; then

* :func:`embed` runs those calls on one chunk of a batch, and
* :class:`CachedModel` stands in for the model while the objective's own ``forward`` runs on the
  whole batch: each declared call ``model.encode_image(batch["image"])`` (by method, batch entry
  and call order) returns the concatenated chunk outputs instead of running the encoder. Every
  other attribute (``logit_scale``, ``parameters()`` for an EMA update, ...) is the model's.

So an objective's loss code is written once, in ``forward``, and is the same with and without
caching. A call the objective did not declare (another method, a tensor that is not a batch entry,
one call more than declared) raises :class:`GradCacheError` rather than silently running the
encoder on the whole batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn as nn

# The model methods that run per-sample encoders (TBPSModel): a CachedModel answers all of them.
ENCODER_METHODS = ("encode_image", "encode_text", "image_tokens", "text_tokens")


@dataclass(frozen=True)
class Embedding:
    """One per-sample encoder call of an objective: ``model.<method>(batch[<key>])``, with gradients
    or (``grad=False``) under ``torch.no_grad()``. Its output is a tensor or a tuple of tensors
    whose first dimension is the batch."""

    method: str  # a model method: encode_image, encode_text, image_tokens, text_tokens
    key: str  # the batch entry it encodes
    grad: bool = True
    call: int = 0  # the n-th call of this method on this entry within one forward

    @property
    def name(self) -> str:
        return f"{self.method}:{self.key}#{self.call}"


class GradCacheError(RuntimeError):
    """An objective's forward does not match the encoder calls it declared for gradient caching."""


def embed(model: nn.Module, plan: list[Embedding], chunk: dict) -> dict[str, Any]:
    """Run the declared calls on ``chunk`` in order; ``grad=False`` calls under ``torch.no_grad()``.
    Calls on entries the batch lacks are skipped (``forward`` reports the missing entry itself)."""
    out: dict[str, Any] = {}
    for e in plan:
        if e.method not in ENCODER_METHODS:
            raise GradCacheError(f"embedding {e.name}: {e.method!r} is not one of {ENCODER_METHODS}")
        if e.key not in chunk:
            continue
        with torch.set_grad_enabled(e.grad and torch.is_grad_enabled()):
            out[e.name] = getattr(model, e.method)(chunk[e.key])
    return out


class CachedModel:
    """The model, with its declared encoder calls on ``batch`` answered from ``features``."""

    def __init__(self, model: nn.Module, plan: list[Embedding], features: dict[str, Any], batch: dict,
                 owner: str = "the objective"):
        self._model, self._features, self._batch, self._owner = model, features, batch, owner
        self._calls: dict[tuple[str, str], int] = {}

    def __getattr__(self, name: str):
        if name in ENCODER_METHODS:
            return partial(self._answer, name)
        return getattr(self._model, name)

    def _answer(self, method: str, x: torch.Tensor):
        key = next((k for k, v in self._batch.items() if v is x), None)
        if key is None:
            raise GradCacheError(f"{self._owner}.forward calls model.{method} on a tensor that is not a batch "
                                 "entry; gradient caching can only answer declared calls on batch entries")
        n = self._calls.get((method, key), 0)
        self._calls[(method, key)] = n + 1
        name = Embedding(method, key, call=n).name
        if name not in self._features:
            raise GradCacheError(f"{self._owner}.forward calls model.{method}(batch[{key!r}]) {n + 1} time(s), "
                                 "more than its embeddings() declares")
        return self._features[name]
