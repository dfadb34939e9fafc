"""A moving average of the model's parameters (EMA), evaluated on val and kept in ``best.pt``
when ``train.ema`` is above 0 (timm's ``ModelEmaV2`` habit; TensorFlow's ramp of the decay):

    avg_t = d_t * avg_(t-1) + (1 - d_t) * theta_t,    d_t = min(train.ema, (1 + t) / (10 + t))

after every optimiser step t (1, 2, ...), from the weights the run starts with. The ramp lets the
average forget the first weights quickly: until ``(1 + t) / (10 + t)`` reaches the decay (step 1,790
for 0.995) it weighs step s about in proportion to ``(s / t) ** 8``, nine tenths of its weight on the
last quarter of the steps.
Parameters only: buffers (masks, position ids) stay the model's. The training itself never sees the
average; ``last.pt`` keeps the online weights and the average (``"ema"``) for resuming, ``best.pt``
the average in place of the weights. One lerp over the parameters a step: about 2.2 ms for the
7.3 M of ``tiny-vit`` on 2 CPU threads (docs/performance-log.md, section 2, tenth sitting).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from tbps.models.momentum import lerp_toward


class WeightAverage:
    """The moving average of ``model``'s parameters (by name), started from their current values."""

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"train.ema is a decay in (0, 1) (0: off), got {decay}")
        self.decay, self.steps = decay, 0
        self.names = [name for name, _ in model.named_parameters()]
        self.tensors = [p.detach().clone() for _, p in model.named_parameters()]

    def _live(self, model: nn.Module) -> list[torch.Tensor]:
        params = dict(model.named_parameters())
        if list(params) != self.names:
            raise RuntimeError("train.ema: the model's parameters changed since the average began")
        return [p.detach() for p in params.values()]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One step of the average, after an optimiser step."""
        self.steps += 1
        d = min(self.decay, (1 + self.steps) / (10 + self.steps))
        lerp_toward(self.tensors, self._live(model), d)

    @contextlib.contextmanager
    def swapped_in(self, model: nn.Module) -> Iterator[None]:
        """``model`` holds the average inside the block (to evaluate or save it), its own weights again after."""
        live = self._live(model)
        own = [p.clone() for p in live]
        with torch.no_grad():
            torch._foreach_copy_(live, self.tensors)
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_(live, own)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "steps": self.steps, "tensors": dict(zip(self.names, self.tensors))}

    def load_state_dict(self, state: dict) -> None:
        """A resumed run's average; one from another model or decay is refused."""
        tensors = state["tensors"]
        if list(tensors) != self.names or any(t.shape != o.shape for t, o in zip(tensors.values(), self.tensors)):
            raise ValueError("last.pt's weight average (train.ema) is not of this model's parameters")
        if state["decay"] != self.decay:
            raise ValueError(f"last.pt's weight average has decay {state['decay']}, the recipe {self.decay}")
        self.steps = int(state["steps"])
        self.tensors = [t.to(o.device, o.dtype).clone() for t, o in zip(tensors.values(), self.tensors)]
