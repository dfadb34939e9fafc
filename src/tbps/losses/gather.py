"""Cross-process feature gathers for losses computed over the global batch (open_clip keeps
``gather_features`` beside its losses for the same reason). Identity without a process group."""

from __future__ import annotations

import torch
import torch.distributed as dist


class _GatherRows(torch.autograd.Function):
    """All-gather along dim 0 whose backward sums every process's gradient for this process's rows.

    Written here rather than taken from ``torch.distributed.nn`` (deprecated there, and its
    autograd nodes hold a process group): both passes use the default group of the moment.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x)
        ctx.rows = x.shape[0]
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone(memory_format=torch.contiguous_format)  # (W*B, ...); all_reduce works in place
        dist.all_reduce(grad)  # a reduce-scatter, spelled so that gloo can run it too
        start = dist.get_rank() * ctx.rows
        return grad[start:start + ctx.rows]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from every process along dim 0, keeping gradients.

    (B, ...) -> (W*B, ...) in rank order; every process must pass the same B. The backward
    pass sums every process's gradient for this process's rows, so with DDP's gradient
    averaging the result equals one process training on the whole global batch. Identity
    without a process group.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    return _GatherRows.apply(x)


def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` (ids, keys) from every process along dim 0, without gradients."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out, dim=0)


def rank_offset(batch_size: int) -> int:
    """Where this process's rows start in the gathered batch."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0
    return dist.get_rank() * batch_size
