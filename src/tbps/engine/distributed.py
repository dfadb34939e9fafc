"""torchrun support: joining the process group (the feature gathers live in ``losses/gather.py``)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owned: bool = False  # this process group was joined by init_distributed: leave_distributed ends it

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str | None = None) -> DistInfo:
    """Join the process group when launched by torchrun (``WORLD_SIZE`` > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    owned = not dist.is_initialized()
    if owned:
        # torch.distributed.nn.functional binds the default group into its functions' default
        # arguments when first imported (open_clip imports it). Imported after the group exists,
        # it keeps the group alive past destroy_process_group; imported first, it binds None.
        import torch.distributed.nn  # noqa: F401

        use_cuda = torch.cuda.is_available() and (device is None or device.startswith("cuda"))
        backend = "nccl" if use_cuda else "gloo"
        if use_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend)
    return DistInfo(rank, world, local_rank, owned)


def leave_distributed(info: DistInfo) -> None:
    """End the process group that :func:`init_distributed` joined (one a caller made is left alone).

    Explicitly, before the process exits: a gloo group still alive at interpreter exit is torn
    down in a race with the other ranks' exits, which now and then aborts a process after its
    work is done ("terminate called without an active exception"), and torchrun then reports
    the whole run as failed."""
    if info.owned and dist.is_initialized():
        dist.destroy_process_group()


def agreed_max(value: float, info: DistInfo, device: torch.device) -> float:
    """The largest of every rank's ``value``, on every rank: one reading of a per-rank clock that all
    ranks then act on (the stage a run is in must be the same on all of them)."""
    if not info.enabled:
        return value
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def all_agree(flag: bool, info: DistInfo, device: torch.device) -> bool:
    """True on every rank when it is true on any: ranks must stop at the same step, or the
    next feature gather would wait forever."""
    return agreed_max(1.0 if flag else 0.0, info, device) > 0.0


def barrier(info: DistInfo) -> None:
    """Wait for every rank (no-op in one process)."""
    if info.enabled:
        dist.barrier()


def broadcast_buffers(module: torch.nn.Module, info: DistInfo) -> None:
    """Rank 0's buffers on every rank, as DDP does before each forward (no-op in one process)."""
    if info.enabled:
        for b in module.buffers():
            dist.broadcast(b.data, 0)


def broadcast_parameters(params: list[torch.nn.Parameter], info: DistInfo) -> None:
    """Rank 0's values of ``params`` on every rank (no-op in one process): weights a rank changed
    outside the optimiser step, such as a stage's fresh modules, must be the same on all of them."""
    if info.enabled:
        for p in params:
            dist.broadcast(p.data, 0)


def average_gradients(module: torch.nn.Module, info: DistInfo) -> None:
    """Average ``.grad`` over the ranks, as DDP's reducer does, for steps that back-propagate more
    than once outside it (gradient caching). A parameter with a gradient on any rank gets the mean
    (zeros where a rank has none); one with a gradient on no rank keeps ``None``, as under DDP with
    ``find_unused_parameters``. One flat all-reduce per step (no-op in one process)."""
    if not info.enabled:
        return
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        return
    device = params[0].device
    used = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=device)
    dist.all_reduce(used)
    params = [p for p, u in zip(params, used.tolist()) if u > 0]
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float() for p in params])
    dist.all_reduce(flat)
    flat /= info.world_size
    offset = 0
    for p in params:
        k = p.numel()
        p.grad = flat[offset:offset + k].view_as(p).to(p.dtype)
        offset += k
