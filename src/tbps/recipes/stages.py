"""Training stages: parts of a run with their own ``losses:`` overrides and learning-rate scale.

A recipe's ``stages:`` is a list of mappings, each placed in one of two ways (one way per recipe):

* **fractions of the run**: ``{start: 0.5, end: 1.0, losses: {...}, lr_scale: 0.2}``, ``start``/``end``
  in [0, 1] (defaults 0 and 1). A fixed epoch count, a step count and a time budget all keep every
  stage: the boundary moves with the length of the run;
* **epochs**: ``{start_epoch: 30, end_epoch: 45, losses: {...}}`` (the paper recipes: the papers
  give their stages in epochs).

**Where a run is.** The run's position is the learning-rate schedule's
(:func:`tbps.engine.optim.schedule_position`): the fractional epochs done (``global_step /
steps_per_epoch``), or under a time budget ``max(that, epochs x elapsed / budget)``, the budget
clock read before every step. A fraction ``f`` is the position ``f x epochs``. So under an
8-minute budget a stage that starts at 0.5 starts after 4 minutes (or half the epochs, if they run
out first), and the stages and the schedule read one clock: they cannot disagree. (With
``train.budget_schedule: false`` the schedule, and so the stages, follow the epochs alone, and a budget
may end before a later stage starts.)

A stage is active at positions ``[start, end)``; ``end: 1`` (or no end) runs to the end of the run.
Active stages' ``losses`` are merged over the recipe's in list order; ``lr_scale`` (default 1)
is the last active stage's. The boundaries of all stages cut the run into **segments**; with
``optim.stage_schedule: restart`` the learning-rate schedule (warm-up, then decay) starts again in
each segment, as a paper's second stage or a fine-tuning run starts its own schedule.

**A fresh optimiser.** ``fresh_optimizer: true`` clears the optimiser's state (AdamW's moment
estimates) when the run enters the stage, as a fine-tuning run starts from a checkpoint with fresh
moments. Without it, a loss switched on mid-run whose gradients are much larger than the ones the
second moments were estimated on is divided by the old, small estimates: AdamW's steps are then many
times their usual size for hundreds of steps (beta2 0.999), until the estimates catch up. The state is
cleared once, when the run crosses the stage's start (a resumed run remembers which stages its
optimiser state belongs to).

**Fresh modules.** ``fresh_modules: [objective.fusion]`` re-initialises the named submodules (paths
under the run's model and objective) when the run enters the stage, once, as ``fresh_optimizer``
clears the moments: a later stage can start with a new head or fusion encoder instead of the one the
base stage trained (:mod:`tbps.engine.fresh_modules`).
"""

from __future__ import annotations

import math
from typing import Any

FRACTION_KEYS = ("start", "end")
EPOCH_KEYS = ("start_epoch", "end_epoch")
STAGE_KEYS = (*FRACTION_KEYS, *EPOCH_KEYS, "losses", "lr_scale", "fresh_optimizer", "fresh_modules")


def by_fraction(stages: list[dict[str, Any]]) -> bool:
    """Whether the stages are placed by fractions of the run (else by epochs)."""
    return any(k in st for st in stages for k in FRACTION_KEYS)


def bounds(stage: dict[str, Any], total_epochs: float) -> tuple[float, float]:
    """A stage's [start, end) as positions in epochs; an open end (or ``end: 1``) is infinite."""
    if any(k in stage for k in FRACTION_KEYS):
        lo, hi = stage.get("start", 0.0) * total_epochs, stage.get("end", 1.0)
        return lo, (math.inf if hi >= 1.0 else hi * total_epochs)
    return stage.get("start_epoch", 0.0), stage.get("end_epoch", math.inf)


def active(stages: list[dict[str, Any]], position: float, total_epochs: float) -> tuple[int, ...]:
    """Indices of the stages active at ``position`` (fractional epochs): the run's current stage key."""
    out = []
    for i, st in enumerate(stages):
        lo, hi = bounds(st, total_epochs)
        if lo <= position < hi:
            out.append(i)
    return tuple(out)


def segment(stages: list[dict[str, Any]], position: float, total_epochs: float) -> tuple[float, float]:
    """The segment [a, b) of the run (in epochs) between consecutive stage boundaries that holds
    ``position``; (0, total_epochs) without stages."""
    cuts = {0.0, float(total_epochs)}
    for st in stages:
        cuts.update(x for x in bounds(st, total_epochs) if 0.0 < x < total_epochs)
    cuts = sorted(cuts)
    a = max((c for c in cuts if c <= position), default=0.0)
    b = min((c for c in cuts if c > position), default=float(total_epochs))
    return a, max(b, a)


def lr_scale(stages: list[dict[str, Any]], position: float, total_epochs: float) -> float:
    """The learning-rate multiplier at ``position``: the last active stage's ``lr_scale`` (1 if none)."""
    scale = 1.0
    for i in active(stages, position, total_epochs):
        scale = stages[i].get("lr_scale", scale)
    return scale


def fresh_optimizer(stages: list[dict[str, Any]], before: tuple[int, ...], now: tuple[int, ...]) -> bool:
    """Whether moving from the stages ``before`` to ``now`` enters a stage that asks for a fresh
    optimiser. ``before`` empty (a run's start) enters nothing: a run starts fresh anyway."""
    return bool(before) and any(stages[i].get("fresh_optimizer", False) for i in set(now) - set(before))


def fresh_modules_entered(stages: list[dict[str, Any]], before: tuple[int, ...], now: tuple[int, ...]) -> list[str]:
    """The submodule paths to re-initialise when moving from the stages ``before`` to ``now``: those of
    the stages entered. ``before`` empty (a run's start) enters nothing: a run starts fresh anyway."""
    if not before:
        return []
    return [path for i in sorted(set(now) - set(before)) for path in stages[i].get("fresh_modules", [])]


def stage_starts(stages: list[dict[str, Any]], total_epochs: float) -> list[float]:
    """Every stage's start position (epochs), in list order."""
    return [bounds(st, total_epochs)[0] for st in stages]


def segment_starts(stages: list[dict[str, Any]], total_epochs: float) -> list[float]:
    """Where each segment of the run begins (epochs, sorted): 0, every stage's start and every end
    before the run's. The losses in force change only there, so these positions give every ``losses:``
    section a run uses (the recipe's own after a stage ends included)."""
    edges = {0.0} | {b for st in stages for b in bounds(st, total_epochs) if b < total_epochs}
    return sorted(edges)
