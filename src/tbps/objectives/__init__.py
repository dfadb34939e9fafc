"""Objectives: which losses a recipe trains with, and how they are weighted.

An objective is an ``nn.Module`` (it may own heads such as a projector or a classifier)
whose ``forward(model, batch, ctx)`` returns a dict of named values; the trainer sums
the ``*_loss`` entries and logs the rest. Recipes select one by name (``objective:``)
and set its losses and weights under ``losses:``. The protocol (every hook the trainer
calls) and the registry are in :mod:`tbps.objectives.base`; each objective module
registers itself when this package is imported.
"""

from __future__ import annotations

from tbps.objectives.base import (
    OBJECTIVES,
    BatchHook,
    Embedding,
    Objective,
    StepContext,
    build_objective,
    merge_losses,
    register,
)

# Imported for their @register: each adds its objective(s) to OBJECTIVES.
from tbps.objectives import irra, laip, mefa, tbps_clip, textreid  # noqa: E402,F401  isort: skip

__all__ = ["OBJECTIVES", "BatchHook", "Embedding", "Objective", "StepContext", "build_objective", "merge_losses", "register"]
