"""The objective protocol: the hooks a trainer calls, the step context, the ``losses:`` merge
and the registry that recipes name objectives by.

The trainer (:mod:`tbps.engine`) calls, in this order:

* once, after building the data set and before the time budget starts: ``prepare_data(dataset)``;
* at the start of every epoch: ``configure(losses)`` with that epoch's ``losses:`` section (stages
  may change it), then ``on_epoch_start(model, dataset, ...)``, then ``batch_hook(dataset)`` for the
  epoch's DataLoader;
* every step: ``forward(model, batch, ctx)`` (through DDP under torchrun), the backward pass and the
  optimiser step, then ``after_step(model)``.

Every hook but ``configure`` and ``forward`` has a no-op default, so an objective overrides only
what it uses.

Gradient caching (``train.grad_cache_chunk``, :mod:`tbps.engine.gradcache`) splits a step into
``embed(model, chunk)`` (the per-sample encoder calls, run chunk by chunk) and
``loss_from_features(model, features, batch, ctx)`` (the losses of the whole batch from those
features). An objective opts in by setting ``not_cacheable = None`` and declaring its encoder calls
in ``embeddings()``; both methods then come from this base class (see :mod:`tbps.objectives.cached`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch
import torch.nn as nn

from tbps.models.momentum import MomentumEncoder
from tbps.objectives.cached import CachedModel, Embedding, embed

OBJECTIVES: dict[str, type["Objective"]] = {}

# (collated batch, tokenizer) -> the batch with extra keys; runs in the DataLoader workers.
BatchHook = Callable[[dict, Any], dict]


@dataclass
class StepContext:
    """Where training is: ``epoch`` is fractional (3.5 = half-way through the 4th epoch)."""

    epoch: float
    total_epochs: float
    step: int


class Objective(nn.Module):
    """Base class of the training objectives: which losses, on which features, with which weights.

    A subclass is built as ``cls(model, losses, num_identities=P)`` and may own modules (heads,
    momentum copies, queues): they are trained and saved with it (``objective.*`` in checkpoints).
    ``defaults`` is its ``losses:`` section with every key; :func:`merge_losses` lays a recipe's
    section over it.
    """

    defaults: ClassVar[dict[str, Any]] = {}
    # Why train.grad_cache_chunk cannot be used with this objective; None when it can (it then
    # declares its encoder calls in embeddings()).
    not_cacheable: ClassVar[str | None] = "it does not declare its encoder calls for gradient caching"

    @classmethod
    def cache_refusal(cls, losses: dict[str, Any]) -> str | None:
        """Why gradient caching cannot train this objective under ``losses`` (a ``losses:`` section, as a
        stage has it); None when it can. The default is the class's ``not_cacheable``; an objective with a
        setting that gradient caching cannot split overrides this."""
        return cls.not_cacheable

    def configure(self, losses: dict[str, Any]) -> None:
        """Apply a (possibly per-stage) ``losses:`` section; called before every epoch. Required."""
        raise NotImplementedError(f"{type(self).__name__} does not implement configure(losses)")

    def prepare_data(self, dataset) -> None:
        """One-off data work (e.g. parsing the training captions), before the time budget starts."""

    def on_epoch_start(self, model: nn.Module, dataset, *, epoch: int, device, progress: bool = False) -> None:
        """Per-epoch data work with the current model (e.g. a feature bank of hard negatives)."""

    def batch_hook(self, dataset=None) -> BatchHook | None:
        """The per-batch data-pipeline hook for this epoch's losses, run in the DataLoader workers
        (``Collate(tokenizer, hook)``); None when the losses need nothing beyond images and tokens."""
        return None

    def forward(self, model: nn.Module, batch: dict, ctx: StepContext) -> dict[str, torch.Tensor]:
        """Named values of one step; the trainer sums the ``*_loss`` entries and logs the rest."""
        raise NotImplementedError(f"{type(self).__name__} does not implement forward(model, batch, ctx)")

    def after_step(self, model: nn.Module) -> None:
        """Run after each optimiser step (EMA updates, queues)."""

    def after_init(self, model: nn.Module) -> None:
        """Run once ``tbps train --init`` has loaded ``model``'s weights (fine-tuning). The objective was
        built before, from the random model: every momentum copy it owns (they copy the whole model)
        is made equal to the loaded model again, so the keys start from the same weights as the
        queries, as MoCo and ALBEF start, not from the random initialisation they would take
        hundreds of EMA steps to forget. An objective with other copies of the model overrides this."""
        for module in self.modules():
            if isinstance(module, MomentumEncoder):
                module.copy_from(model)

    # ------------------------------------------------------------------ gradient caching
    def embeddings(self) -> list[Embedding]:
        """The per-sample encoder calls of ``forward`` under the current losses, in the order it
        makes them (only for objectives with ``not_cacheable = None``)."""
        raise NotImplementedError(f"{type(self).__name__} cannot be trained with gradient caching: "
                                  f"{self.not_cacheable}")

    def embed(self, model: nn.Module, chunk: dict) -> dict[str, Any]:
        """The declared encoder calls on a chunk of the batch: ``{Embedding.name: output}``."""
        return embed(model, self.embeddings(), chunk)

    def loss_from_features(self, model: nn.Module, features: dict[str, Any], batch: dict,
                           ctx: StepContext) -> dict[str, torch.Tensor]:
        """``forward``'s outputs for the whole ``batch`` with every declared encoder call answered
        from ``features`` (the chunks' outputs, concatenated) instead of running the encoders."""
        return self.forward(CachedModel(model, self.embeddings(), features, batch, type(self).__name__), batch, ctx)


def merge_losses(defaults: dict[str, Any], given: dict[str, Any], where: str = "losses") -> dict[str, Any]:
    """An objective's ``losses:`` section over its defaults: unknown keys are errors, values
    take the defaults' types."""
    from tbps.recipes.config import ConfigError, coerce_like

    unknown = set(given) - set(defaults)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {sorted(unknown)}; known: {sorted(defaults)}")
    out = {}
    for k, v in defaults.items():
        g = given.get(k, v)
        out[k] = merge_losses(v, g, f"{where}.{k}") if isinstance(v, dict) else coerce_like(v, g, f"{where}.{k}")
    return out


def register(name: str):
    """Class decorator: make an :class:`Objective` known to recipes as ``objective: name``."""

    def deco(cls: type[Objective]) -> type[Objective]:
        if name in OBJECTIVES and OBJECTIVES[name] is not cls:
            raise ValueError(f"objective {name!r} is registered twice ({OBJECTIVES[name].__name__}, {cls.__name__})")
        OBJECTIVES[name] = cls
        return cls

    return deco


def build_objective(name: str, model: nn.Module, losses: dict[str, Any], *, num_identities: int) -> Objective:
    """The objective a recipe names, built for ``model`` with a ``losses:`` section."""
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; known: {sorted(OBJECTIVES)}")
    return OBJECTIVES[name](model, losses, num_identities=num_identities)
