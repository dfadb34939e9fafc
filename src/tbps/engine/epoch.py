"""One epoch of optimiser steps: the step loop of a training run.

:func:`train_one_epoch` walks an epoch's DataLoader from a given batch: the learning rate at the
step's schedule position, the objective's forward under AMP, backward through the gradient
scaler (with optional clipping), the logit-scale clamp and the objective's ``after_step``; a
progress bar; and a time-budget check that every rank agrees on, so all stop at the same step.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.nn as nn
from tqdm import tqdm

from tbps.engine import gradcache
from tbps.engine.distributed import DistInfo, agreed_max, all_agree, average_gradients, broadcast_buffers
from tbps.engine.ema import WeightAverage
from tbps.engine.optim import schedule_position, set_lr, staged_lr
from tbps.engine.runtime import Budget
from tbps.objectives.base import Objective, StepContext
from tbps.recipes.config import ConfigError, Recipe


@dataclass
class Amp:
    """Mixed precision: on CUDA only; bfloat16 where supported, else float16 with loss scaling."""

    enabled: bool
    dtype: torch.dtype

    @classmethod
    def choose(cls, wanted: bool, device: torch.device, dtype: str = "auto") -> "Amp":
        enabled = wanted and device.type == "cuda"
        if dtype not in ("auto", "float16", "bfloat16"):
            raise ConfigError(f"train.amp_dtype must be auto, float16 or bfloat16, got {dtype!r}")
        if dtype == "auto":
            dtype = "bfloat16" if enabled and torch.cuda.is_bf16_supported() else "float16"
        return cls(enabled, getattr(torch, dtype))

    def scaler(self) -> torch.amp.GradScaler:
        """A gradient scaler, active for float16 only (bfloat16 needs none)."""
        return torch.amp.GradScaler("cuda", enabled=self.enabled and self.dtype == torch.float16)


@dataclass
class Loop:
    """The parts of a run that the step loop touches, built once by :func:`tbps.engine.train.train`."""

    model: nn.Module
    objective: Objective
    module: nn.Module  # model + objective as one module: gradients are clipped over its parameters
    train_module: nn.Module  # ``module``, wrapped in DDP under torchrun
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    amp: Amp
    device: torch.device
    dist: DistInfo
    recipe: Recipe
    epochs: int
    steps_per_epoch: int
    budget: Budget
    schedule_budget: float | None = None  # seconds: run the lr schedule to its end by then (None: by epochs)
    global_step: int = 0
    stage: tuple[int, ...] = ()  # the recipe's stages whose losses the objective is configured with
    ema: WeightAverage | None = None  # train.ema: the weights' moving average, updated after each step

    def elapsed(self) -> float:
        """Budget-clock seconds of the whole run, resumes included."""
        return self.budget.elapsed()

    def position(self) -> float:
        """Where the next step is, in fractional epochs on the schedule's clock (the share of a time
        budget spent, when that is further): the learning rate and the stages both read it."""
        return schedule_position(self.global_step / self.steps_per_epoch, self.epochs, self.elapsed(),
                                 self.schedule_budget)

    def agreed_position(self) -> float:
        """:meth:`position`, the furthest any rank reads (under a time budget each rank has its own clock)."""
        return agreed_max(self.position(), self.dist, self.device)

    def stage_changed(self, position: float) -> bool:
        """Whether ``position`` (the :meth:`agreed_position` of the next step) falls in other stages than the
        objective is configured for."""
        return bool(self.recipe.stages) and self.recipe.stage_at(position, self.epochs) != self.stage


@dataclass
class EpochEnd:
    step_in_epoch: int  # batches of the epoch done (== steps_per_epoch when it ran to its end)
    stopped_by_budget: bool
    stage_switch: bool = False  # stopped because the next step belongs to another stage (losses change)


def train_one_epoch(loop: Loop, loader: Iterable[dict], *, epoch: int, start_batch: int = 0, progress: bool = True,
                    on_log: Callable[[int, float, float], None] | None = None) -> EpochEnd:
    """Train on ``loader``'s batches (epoch ``epoch``, from batch ``start_batch``), stopping early
    when the time budget is spent or the next step belongs to another stage of the recipe (the
    caller then configures the new losses and continues the epoch from ``step_in_epoch``).
    ``on_log(step, loss, lr)`` is called every ``train.log_every`` steps and at the end of the epoch."""
    tcfg = loop.recipe.train
    bar = tqdm(total=loop.steps_per_epoch, initial=start_batch, desc=f"epoch {epoch + 1}/{loop.epochs}", unit="step",
               disable=not progress, leave=False, dynamic_ncols=True)
    seen, t0 = 0, time.perf_counter()
    step_in_epoch, stopped, switch = start_batch, False, False
    for batch in loader:
        outputs, loss, lr = _step(loop, batch, epoch + step_in_epoch / loop.steps_per_epoch)
        loop.global_step += 1
        step_in_epoch += 1
        seen += batch["tokens"].shape[0] * loop.dist.world_size
        if loop.global_step % tcfg.log_every == 0 or step_in_epoch == loop.steps_per_epoch:
            ips = seen / max(time.perf_counter() - t0, 1e-9)
            parts = {k.removesuffix("_loss"): f"{v.item():.3f}" for k, v in outputs.items() if k.endswith("_loss")}
            bar.set_postfix(loss=f"{loss.item():.3f}", **parts, lr=f"{lr:.2e}", img_s=f"{ips:.0f}")
            if on_log is not None:
                on_log(loop.global_step, loss.item(), lr)
        bar.update(1)
        if all_agree(loop.budget.spent(), loop.dist, loop.device):
            stopped = True
            break
        if loop.recipe.stages and step_in_epoch < loop.steps_per_epoch and loop.stage_changed(loop.agreed_position()):
            switch = True
            break
    bar.close()
    return EpochEnd(step_in_epoch, stopped, switch)


def _step(loop: Loop, batch: dict, progress: float) -> tuple[dict[str, torch.Tensor], torch.Tensor, float]:
    """One optimiser step at fractional epoch ``progress``; returns the objective's outputs, the
    summed loss and the learning rate used."""
    tcfg, device = loop.recipe.train, loop.device
    lr = staged_lr(schedule_position(progress, loop.epochs, loop.elapsed(), loop.schedule_budget), loop.epochs,
                   loop.recipe.optim, loop.recipe.stages)
    set_lr(loop.optimizer, lr)
    batch = {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}
    ctx = StepContext(epoch=progress, total_epochs=loop.epochs, step=loop.global_step)
    loop.optimizer.zero_grad(set_to_none=True)
    with attention_kernel(tcfg.attention):
        if tcfg.grad_cache_chunk > 0:
            outputs, loss = _cached_forward_backward(loop, batch, ctx)
        else:
            with torch.autocast(device.type, dtype=loop.amp.dtype, enabled=loop.amp.enabled):
                outputs = loop.train_module(batch, ctx)
            loss = sum(v for k, v in outputs.items() if k.endswith("_loss"))
            loop.scaler.scale(loss).backward()
    if tcfg.grad_clip > 0:
        loop.scaler.unscale_(loop.optimizer)
        torch.nn.utils.clip_grad_norm_(loop.module.parameters(), tcfg.grad_clip)
    loop.scaler.step(loop.optimizer)
    loop.scaler.update()
    if tcfg.logit_scale_clamp == "step":  # "forward": capped inside the forward instead (TBPSModel.scale)
        with torch.no_grad():
            loop.model.logit_scale.clamp_(0, math.log(tcfg.logit_scale_max))
    loop.objective.after_step(loop.model)
    if loop.ema is not None:
        loop.ema.update(loop.model)
    return outputs, loss, lr


def attention_kernel(choice: str) -> contextlib.AbstractContextManager:
    """``train.attention``: auto leaves torch's choice; math holds the math backend (a fresh context
    per step: sdpa_kernel's is single-use)."""
    if choice == "math":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel(SDPBackend.MATH)
    return contextlib.nullcontext()


def _cached_forward_backward(loop: Loop, batch: dict, ctx: StepContext) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The step's forward and backward by gradient caching (``train.grad_cache_chunk``) on the
    unwrapped module; under torchrun the gradients are then averaged here instead of by DDP."""
    device, amp = loop.device, loop.amp
    broadcast_buffers(loop.module, loop.dist)
    outputs, loss = gradcache.forward_backward(
        loop.objective, loop.model, batch, ctx, loop.recipe.train.grad_cache_chunk,
        backward=lambda t: loop.scaler.scale(t).backward(),
        autocast=lambda: torch.autocast(device.type, dtype=amp.dtype, enabled=amp.enabled))
    average_gradients(loop.module, loop.dist)
    return outputs, loss
