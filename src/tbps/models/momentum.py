"""Momentum (EMA) copies of a module and FIFO queues of their keys, as MoCo / ALBEF / TextReID keep them.

``MomentumEncoder(model, m)`` holds a frozen deep copy of ``model``; ``update(model)``
moves every parameter to ``m * key + (1 - m) * online`` and copies buffers. The copy
never receives gradients and is never seen by the optimiser (``requires_grad=False``).
``FeatureQueue(K, D)`` keeps the last K keys and their person ids for contrast.

    ema = MomentumEncoder(model, momentum=0.999)
    ema.update(model)                   # once per step, before keys are computed
    with torch.no_grad():
        keys = ema.module.encode_text(tokens)
    queue = FeatureQueue(size=2048, dim=keys.shape[1])
    queue.enqueue(keys, person_ids)     # after the loss: a batch is never its own queue negative
"""

from __future__ import annotations

import copy

import torch
from torch import nn


@torch.no_grad()
def lerp_toward(targets: list[torch.Tensor], sources: list[torch.Tensor], momentum: float) -> None:
    """targets <- momentum * targets + (1 - momentum) * sources, tensor by tensor, in one foreach kernel.

    The one moving-average step of tbps: MoCo keys here, the weight average of ``train.ema``
    (engine/ema.py) in the trainer."""
    if len(targets) != len(sources):
        raise ValueError(f"EMA target has {len(targets)} parameters, source {len(sources)}: not copies of one module")
    sources = [s.detach().to(t.dtype) for t, s in zip(targets, sources)]
    torch._foreach_lerp_(targets, sources, 1.0 - momentum)


@torch.no_grad()
def ema_update(target: nn.Module, source: nn.Module, momentum: float) -> None:
    """target <- momentum * target + (1 - momentum) * source, parameter by parameter.

    Buffers (running stats, queues of the source) are copied as they are. The two
    modules must have the same structure (one is a deep copy of the other).
    """
    lerp_toward(list(target.parameters()), list(source.parameters()), momentum)
    for t, s in zip(target.buffers(), source.buffers()):
        t.copy_(s)


class MomentumEncoder(nn.Module):
    """A frozen EMA copy of ``module`` (keys for contrast with queues)."""

    def __init__(self, module: nn.Module, momentum: float = 0.999, *, train_mode: bool = False):
        super().__init__()
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1], got {momentum}")
        self.momentum = float(momentum)
        self.train_mode = bool(train_mode)
        self.module = copy.deepcopy(module)
        self.module.requires_grad_(False)
        self.module.train(self.train_mode and module.training)

    def train(self, mode: bool = True) -> MomentumEncoder:
        # Default: the key encoder stays in eval mode whatever the parent does (no dropout noise in keys;
        # BatchNorm on the copied running statistics). ``train_mode``: it follows the parent, as
        # TextReID's key encoders (BatchNorm on the batch's statistics) and MoCo's do.
        super().train(mode)
        self.module.train(mode and self.train_mode)
        return self

    def copy_from(self, online: nn.Module) -> None:
        """Make this copy equal to ``online`` again (after its weights were replaced, e.g. by ``--init``)."""
        self.module.load_state_dict(online.state_dict())

    def update(self, online: nn.Module) -> None:
        """One EMA step towards ``online`` (the trained module this copy was made from)."""
        ema_update(self.module, online, self.momentum)

    def forward(self, *args, **kwargs):
        with torch.no_grad():
            return self.module(*args, **kwargs)


class FeatureQueue(nn.Module):
    """FIFO ring buffer of ``size`` keys (D-dim) with their person ids.

    Empty slots have id -1 and are never used as negatives. All state is in buffers,
    so it is saved with the objective and restored on resume.
    """

    def __init__(self, size: int, dim: int):
        super().__init__()
        if size < 0:
            raise ValueError(f"queue size must be >= 0, got {size}")
        self.size = int(size)
        self.register_buffer("feats", torch.zeros(size, dim))  # (K, D)
        self.register_buffer("ids", torch.full((size,), -1, dtype=torch.long))  # (K,), -1 = empty
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    @property
    def valid(self) -> torch.Tensor:
        """(K,) bool: slots holding a key."""
        return self.ids >= 0

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor, ids: torch.Tensor) -> None:
        """Write (B, D) keys and (B,) ids at the pointer, wrapping around; the oldest go first.

        Pass keys already gathered from every process, so all ranks hold the same queue.
        A batch larger than the queue keeps only its last ``size`` rows.
        """
        if self.size == 0:
            return
        keys, ids = keys.detach().to(self.feats.dtype), ids.detach().long()
        if keys.shape[0] > self.size:
            keys, ids = keys[-self.size :], ids[-self.size :]
        n = keys.shape[0]
        slots = (self.ptr + torch.arange(n, device=self.ids.device)) % self.size
        self.feats[slots] = keys
        self.ids[slots] = ids
        self.ptr.fill_(int((self.ptr + n) % self.size))
