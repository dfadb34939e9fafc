"""What a run needs of the machine: seeding, time budgets, and how many CPU threads to use."""

from __future__ import annotations

import os
import random
import time


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


class Budget:
    """A time budget in minutes; ``None`` means unlimited.

    ``clock="wall"`` counts wall-clock time. ``clock="cpu"`` counts this process's CPU time
    (all its threads, :func:`time.process_time`): runs compared "at equal budget" then get
    equal compute even when other work shares the machine (DataLoader workers are other
    processes and are not counted).
    """

    CLOCKS = ("wall", "cpu")

    def __init__(self, minutes: float | None, clock: str = "wall"):
        if clock not in self.CLOCKS:
            raise ValueError(f"budget clock {clock!r} is not one of {self.CLOCKS}")
        self.seconds = None if minutes is None else float(minutes) * 60.0
        self._now = time.monotonic if clock == "wall" else time.process_time
        self.start = self._now()

    def elapsed(self) -> float:
        return self._now() - self.start

    def spent(self) -> bool:
        return self.seconds is not None and self.elapsed() >= self.seconds


def cpu_threads(requested: int, workers: int, world_size: int) -> int:
    """Never oversubscribe the cores: with two cores, two torch threads beside a busy DataLoader
    worker ran 3-6x slower per step than one thread (OpenMP threads wait on each other)."""
    if requested > 0:
        return requested
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // world_size - workers)
