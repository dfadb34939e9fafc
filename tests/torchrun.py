"""Helpers for tests that run two CPU processes the way torchrun would (gloo)."""

from __future__ import annotations

import os
import socket


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_env(rank: int, world: int, port: int) -> None:
    """The variables torchrun sets for one process on one machine."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))


def join(rank: int, world: int, port: int):
    """Join the group as tbps does under torchrun; end with ``leave_distributed`` of the result."""
    from tbps.engine.distributed import init_distributed

    torchrun_env(rank, world, port)
    info = init_distributed("cpu")
    assert info.owned and info.world_size == world
    return info
