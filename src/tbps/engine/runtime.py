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


class DeviceError(ValueError):
    """A device name that is malformed or not present on this machine (one line, exit 2)."""

    user_error = True


def check_device(name: str | None, default: str | None = None) -> str:
    """``name`` (``cpu``, ``cuda``, ``cuda:N``, ``mps``) checked against this machine, or ``default``
    (None: cuda when available, else cpu). Raises :class:`DeviceError` naming it, before any work."""
    import torch

    if name is None:
        return default or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(str(name))
    except (RuntimeError, ValueError, TypeError):
        raise DeviceError(f"--device {name!r} is not a device: use cpu, cuda or cuda:N") from None
    if dev.type == "cpu":
        return str(dev)
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise DeviceError(f"--device {name}: no CUDA GPU is available here (use --device cpu)")
        if dev.index is not None and dev.index >= n:
            raise DeviceError(f"--device {name}: this machine has {n} CUDA GPU(s), cuda:0 to cuda:{n - 1}")
        return str(dev)
    if dev.type == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise DeviceError(f"--device {name}: Apple's MPS is not available here (use --device cpu)")
        return str(dev)
    raise DeviceError(f"--device {name!r}: tbps runs on cpu, cuda or cuda:N")
