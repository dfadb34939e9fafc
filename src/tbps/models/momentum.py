"""Momentum (EMA) copies of a module, as MoCo / ALBEF / TextReID keep them.

``MomentumEncoder(model, m)`` holds a frozen deep copy of ``model``; ``update(model)``
moves every parameter to ``m * key + (1 - m) * online`` and copies buffers. The copy
never receives gradients and is never seen by the optimiser (``requires_grad=False``).

    ema = MomentumEncoder(model, momentum=0.999)
    ema.update(model)                   # once per step, before keys are computed
    with torch.no_grad():
        keys = ema.module.encode_text(tokens)
"""

from __future__ import annotations

import copy

import torch
from torch import nn


@torch.no_grad()
def ema_update(target: nn.Module, source: nn.Module, momentum: float) -> None:
    """target <- momentum * target + (1 - momentum) * source, parameter by parameter.

    Buffers (running stats, queues of the source) are copied as they are. The two
    modules must have the same structure (one is a deep copy of the other).
    """
    tp, sp = list(target.parameters()), list(source.parameters())
    if len(tp) != len(sp):
        raise ValueError(f"EMA target has {len(tp)} parameters, source {len(sp)}: not copies of one module")
    for t, s in zip(tp, sp):
        t.mul_(momentum).add_(s.detach().to(t.dtype), alpha=1.0 - momentum)
    for t, s in zip(target.buffers(), source.buffers()):
        t.copy_(s)


class MomentumEncoder(nn.Module):
    """A frozen EMA copy of ``module`` (keys for contrast with queues)."""

    def __init__(self, module: nn.Module, momentum: float = 0.999):
        super().__init__()
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1], got {momentum}")
        self.momentum = float(momentum)
        self.module = copy.deepcopy(module)
        self.module.requires_grad_(False)
        self.module.eval()  # keys without dropout noise; BatchNorm uses the copied running statistics

    def train(self, mode: bool = True) -> MomentumEncoder:
        # The key encoder stays in eval mode whatever the parent does (no dropout noise in keys).
        super().train(mode)
        self.module.eval()
        return self

    def update(self, online: nn.Module) -> None:
        """One EMA step towards ``online`` (the trained module this copy was made from)."""
        ema_update(self.module, online, self.momentum)

    def forward(self, *args, **kwargs):
        with torch.no_grad():
            return self.module(*args, **kwargs)
