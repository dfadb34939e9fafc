"""Optimiser with the paper's parameter groups, and the per-step learning-rate schedule."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from tbps.recipes import stages as stage_plan
from tbps.recipes.config import OptimConfig


def _no_decay(name: str, p: nn.Parameter) -> bool:
    # Biases, norm weights, logit scale and every other 1-d parameter get no weight decay.
    return p.ndim < 2 or name.endswith(".bias") or "logit_scale" in name


def param_groups(modules: dict[str, nn.Module], cfg: OptimConfig) -> list[dict]:
    """Groups keyed by (lr factor, decay). ``modules`` maps a prefix to a module so that
    ``cfg.lr_factors`` can address e.g. ``objective.`` or ``model.clip.visual.``."""
    groups: dict[tuple[float, bool], list[nn.Parameter]] = {}
    for prefix, module in modules.items():
        for name, p in module.named_parameters():
            if not p.requires_grad:
                continue
            full = f"{prefix}.{name}"
            factor = 1.0
            for key, f in cfg.lr_factors.items():
                if full.startswith(key):
                    factor = f
            if cfg.bias_lr_factor != 1.0 and full.endswith(".bias"):
                factor = cfg.bias_lr_factor
            groups.setdefault((factor, not _no_decay(name, p)), []).append(p)
    return [
        {"params": ps, "lr_factor": factor, "weight_decay": cfg.weight_decay if decay else 0.0}
        for (factor, decay), ps in groups.items()
    ]


def build_optimizer(modules: dict[str, nn.Module], cfg: OptimConfig) -> torch.optim.Optimizer:
    """The recipe's optimiser over :func:`param_groups` (trainable parameters only)."""
    groups = param_groups(modules, cfg)
    name = cfg.name.lower()
    fused = True if cfg.fused else None  # None: torch's default implementation for the device
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=fused)
    if name == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=fused)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, fused=fused)
    if cfg.fused:
        raise ValueError(f"optim.fused: {cfg.name!r} has no fused implementation (adamw, adam and sgd have)")
    if name == "lamb":  # layer-wise adaptive moments (You et al.), as EVA-CLIP trains; timm's, which open_clip needs
        from timm.optim import Lamb

        return Lamb(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
    raise ValueError(f"unknown optimiser {cfg.name!r}: adamw, adam, sgd or lamb")


def lr_at(progress_epochs: float, total_epochs: float, cfg: OptimConfig) -> float:
    """Learning rate at a fractional epoch: linear warm-up from ``warmup_start_lr``, then
    cosine decay to ``min_lr`` at ``total_epochs`` (or step decay at ``milestones``). With
    ``schedule_unit: epoch`` the position is rounded down to the epoch (a per-epoch scheduler)."""
    if cfg.schedule_unit == "epoch":
        progress_epochs = math.floor(progress_epochs)
    elif cfg.schedule_unit != "step":
        raise ValueError(f"unknown schedule_unit {cfg.schedule_unit!r}: step or epoch")
    if progress_epochs < cfg.warmup_epochs:
        t = progress_epochs / cfg.warmup_epochs
        return cfg.warmup_start_lr + t * (cfg.lr - cfg.warmup_start_lr)
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "step":
        return cfg.lr * cfg.gamma ** sum(progress_epochs >= m for m in cfg.milestones)
    if cfg.schedule == "cosine":
        span = max(total_epochs - cfg.warmup_epochs, 1e-8)
        t = min(max((progress_epochs - cfg.warmup_epochs) / span, 0.0), 1.0)
        return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * t))
    raise ValueError(f"unknown schedule {cfg.schedule!r}: cosine, step or constant")


def staged_lr(position: float, total_epochs: float, cfg: OptimConfig, stages: list[dict] | None = None) -> float:
    """The learning rate at ``position`` (fractional epochs on the schedule's clock) of a run with
    ``stages`` (:mod:`tbps.recipes.stages`): with ``cfg.stage_schedule == "restart"`` the schedule
    (warm-up, decay) runs within the stage segment that holds the position, from its start;
    with ``continue`` over the whole run. Times the active stage's ``lr_scale``."""
    stages = stages or []
    scale = stage_plan.lr_scale(stages, position, total_epochs)
    if cfg.stage_schedule == "restart" and stages:
        a, b = stage_plan.segment(stages, position, total_epochs)
        return scale * lr_at(position - a, b - a, cfg)
    if cfg.stage_schedule not in ("continue", "restart"):
        raise ValueError(f"unknown stage_schedule {cfg.stage_schedule!r}: continue or restart")
    return scale * lr_at(position, total_epochs, cfg)


def schedule_position(progress: float, total_epochs: float, elapsed: float, budget_seconds: float | None) -> float:
    """The fractional epoch at which to read the schedule. Under a time budget (``budget_seconds``)
    that is the tighter limit, the schedule runs on the share of the budget spent, so it reaches its
    end by the deadline: ``max(progress, total_epochs * elapsed / budget_seconds)``."""
    if budget_seconds is None:
        return progress
    return max(progress, total_epochs * elapsed / budget_seconds)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's learning rate to ``lr`` times its ``lr_factor``."""
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_factor", 1.0)
