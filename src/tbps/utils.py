"""Small shared helpers: atomic file writes, seeding, and wall-clock budgets."""

from __future__ import annotations

import contextlib
import json
import os
import random
import tempfile
import time
from pathlib import Path
from typing import IO, Any, Iterator


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path``; on clean exit fsync it and rename it over ``path``.

    A crash (or kill -9) at any moment leaves either the old file or the complete new one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    with atomic_write(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")


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
