"""What a run needs of the machine: seeding, time budgets, and how many CPU threads to use."""

from __future__ import annotations

import math
import os
import random
import re
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
    processes and are not counted). ``before``: seconds of the same clock a run spent before it was
    resumed; they count against the budget (the budget is the whole run's, as its schedule is).
    """

    CLOCKS = ("wall", "cpu")

    def __init__(self, minutes: float | None, clock: str = "wall", before: float = 0.0):
        if clock not in self.CLOCKS:
            raise ValueError(f"budget clock {clock!r} is not one of {self.CLOCKS}")
        self.seconds = None if minutes is None else float(minutes) * 60.0
        self.before = float(before)
        self._now = time.monotonic if clock == "wall" else time.process_time
        self.start = self._now()

    def elapsed(self) -> float:
        """Seconds of the whole run so far: before the resume, and since."""
        return self.before + self._now() - self.start

    def spent(self) -> bool:
        return self.seconds is not None and self.elapsed() >= self.seconds


class Eta:
    """Time left in a run of known length, from the steps measured so far.

    The first ``skip`` steps after ``first_step`` are not timed (allocator warm-up, first-batch
    caching); the rate is measured from there on, so it includes whatever else the run does between
    steps (evaluation) once that has happened. ``clock`` is injectable for tests.
    """

    def __init__(self, total_steps: int, first_step: int = 0, skip: int = 5, clock=time.monotonic):
        self.total, self.skip, self.clock = total_steps, skip, clock
        self.first_step, self.t0, self.s0 = first_step, None, None
        self.reported = False

    def tick(self, step: int) -> None:
        """Note that ``step`` optimiser steps (of the whole run) are done."""
        if self.t0 is None and step >= self.first_step + self.skip:
            self.t0, self.s0 = self.clock(), step

    def seconds_left(self, step: int) -> float | None:
        """Seconds until the last step at the rate measured since the timed start; None before
        any step was timed."""
        if self.t0 is None or step <= self.s0:
            return None
        rate = (step - self.s0) / max(self.clock() - self.t0, 1e-9)
        return max(self.total - step, 0) / rate

    def first_report(self, step: int, limit: float | None = None, after: int = 20) -> str | None:
        """:meth:`line` once, as soon as ``after`` steps have been timed; None otherwise."""
        if self.reported or self.t0 is None or step < self.s0 + after:
            return None
        self.reported = True
        return self.line(step, limit)

    def line(self, step: int, limit: float | None = None) -> str | None:
        """``"step 30/609, 0.62 s/step, about 6 min 0 s left"`` (None before any step was timed);
        ``limit``: seconds after which the run stops anyway (a time budget's rest)."""
        left = self.seconds_left(step)
        if left is None:
            return None
        per = (self.clock() - self.t0) / (step - self.s0)
        if limit is not None and limit < left:
            return (f"step {step}/{self.total}, {per:.2f} s/step: the time budget ends the run in "
                    f"{format_duration(max(limit, 0))}, about step {step + int(max(limit, 0) / left * (self.total - step))}")
        return f"step {step}/{self.total}, {per:.2f} s/step, about {format_duration(left)} left"


def format_duration(seconds: float) -> str:
    """``75.4`` -> ``"1 min 15 s"``; under a minute ``"42 s"``; from an hour ``"1 h 05 min"``."""
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def passive_openmp_waits() -> bool:
    """Make OpenMP threads sleep, not spin, while they wait (``OMP_WAIT_POLICY=PASSIVE``) unless the
    user chose a policy. Returns whether it was set. Only a process that has not loaded torch yet is
    affected: the OpenMP runtime reads the variable once, when torch loads it (the CLI calls this
    first thing). Measured (docs/performance.md, section 2): beside other work, a 2-thread step with
    spinning waits (libgomp's default) was 4.7x slower than a 1-thread step, with sleeping waits 1.6x."""
    import sys

    if "OMP_WAIT_POLICY" in os.environ or "torch" in sys.modules:
        return False
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    return True


def choose_threads(requested: int, cores: int, workers: int, world_size: int, busy_elsewhere: float) -> int:
    """Torch threads for a CPU run: ``requested`` when > 0; else this process's share of the
    ``cores`` (less one per DataLoader worker), but no more than the cores that other work leaves
    free (``busy_elsewhere``: cores' worth of other runnable work, rounded to the nearest core). A
    thread on a core that another process also wants makes every step wait for its slowest slice."""
    if requested > 0:
        return requested
    share = max(1, cores // world_size - workers)
    free = int(math.floor(cores - max(busy_elsewhere, 0.0) + 0.5))
    return max(1, min(share, free))


def busy_cores(stat_before: str, stat_after: str) -> float:
    """Cores' worth of work the machine did between two readings of ``/proc/stat``: the share of
    non-idle time on its aggregate ``cpu`` line (idle and iowait are idle) times the number of
    ``cpuN`` lines."""
    def times(text: str) -> tuple[int, int, int]:
        lines = text.splitlines()
        fields = [int(x) for x in lines[0].split()[1:]]
        return sum(fields[:8]), fields[3] + fields[4], sum(1 for ln in lines if re.match(r"cpu\d+ ", ln))

    (total0, idle0, cores), (total1, idle1, _) = times(stat_before), times(stat_after)
    if total1 <= total0:
        return 0.0
    return cores * (1.0 - (idle1 - idle0) / (total1 - total0))


def busy_elsewhere(own_threads: float = 0.0, sample_s: float = 0.3) -> float:
    """Cores' worth of runnable work besides this process. On Linux: measured over ``sample_s``
    from ``/proc/stat`` while this process waits (call it between steps, when this process's own
    threads are idle); elsewhere: the 1-minute load average less ``own_threads``; 0 without either."""
    try:
        with open("/proc/stat") as f:
            before = f.read()
        time.sleep(sample_s)
        with open("/proc/stat") as f:
            return busy_cores(before, f.read())
    except (OSError, ValueError, IndexError):
        pass
    try:
        return max(os.getloadavg()[0] - own_threads, 0.0)
    except (AttributeError, OSError):
        return 0.0


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def cpu_threads(requested: int, workers: int, world_size: int, own_threads: float = 1.0) -> int:
    """:func:`choose_threads` on this machine now (``own_threads``: how many of this process's
    threads ran over the last minute, which a load average counts too). Measures only when
    ``requested`` is 0."""
    if requested > 0:
        return requested
    return choose_threads(0, usable_cores(), workers, world_size, busy_elsewhere(own_threads))


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
