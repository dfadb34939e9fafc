"""Objectives: which losses a recipe trains with, and how they are weighted.

An objective is an ``nn.Module`` (it may own heads such as a projector or a classifier)
whose ``forward(model, batch, ctx)`` returns a dict of named values; the trainer sums
the ``*_loss`` entries and logs the rest. Recipes select one by name (``objective:``)
and set its losses and weights under ``losses:``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch.nn as nn

OBJECTIVES: dict[str, Callable[..., "Objective"]] = {}


@dataclass
class StepContext:
    """Where training is: ``epoch`` is fractional (3.5 = half-way through the 4th epoch)."""

    epoch: float
    total_epochs: float
    step: int


class Objective(nn.Module):
    """Base class: subclasses implement ``configure`` and ``forward``."""

    def configure(self, losses: dict[str, Any]) -> None:
        """Apply a (possibly per-stage) ``losses:`` section."""
        raise NotImplementedError

    def after_step(self, model: nn.Module) -> None:
        """Hook run after each optimiser step (EMA updates, queues)."""


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
    def deco(cls):
        OBJECTIVES[name] = cls
        return cls

    return deco


def build_objective(name: str, model: nn.Module, losses: dict[str, Any], *, num_identities: int) -> Objective:
    from tbps.objectives import tbps_clip  # noqa: F401  (registers itself)

    if name in ("irra", "laip", "mefa"):  # fusion-encoder objectives (issue 6) and MeFa (issue 5)
        import importlib

        importlib.import_module(f"tbps.objectives.{name}")
    if name in ("textreid", "tbps-clip-cmmoco"):  # CM-MoCo objectives (issue 4)
        from tbps.objectives import textreid  # noqa: F401  (registers both)

    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; known: {sorted(OBJECTIVES)}")
    return OBJECTIVES[name](model, losses, num_identities=num_identities)
