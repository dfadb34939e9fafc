"""Cross-process feature gathers for losses computed over the global batch (open_clip keeps
``gather_features`` beside its losses for the same reason). Identity without a process group."""

from __future__ import annotations

import torch
import torch.distributed as dist


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from every process along dim 0, keeping gradients.

    (B, ...) -> (W*B, ...) in rank order. The backward pass sums each process's
    gradient for its own rows, so with DDP's gradient averaging the result equals
    one process training on the whole global batch. Identity without a process group.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    import torch.distributed.nn.functional as dist_fn

    return torch.cat(dist_fn.all_gather(x), dim=0)


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
