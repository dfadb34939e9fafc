"""The learning-rate schedule (warm-up, cosine, step, constant, and the budget-compressed position
`make demo` trains with) and the masked-token loss, against hand computations."""

from __future__ import annotations

import math

import pytest
import torch

from tbps.engine.optim import lr_at, schedule_position
from tbps.losses.mlm import masked_token_loss
from tbps.recipes.config import OptimConfig


def cfg(**kw) -> OptimConfig:
    base = dict(lr=1e-3, warmup_epochs=1.0, warmup_start_lr=1e-5, min_lr=1e-5, schedule="cosine")
    return OptimConfig(**{**base, **kw})


def test_warm_up_is_linear_from_the_start_lr():
    c = cfg()
    assert lr_at(0.0, 10, c) == pytest.approx(1e-5)
    assert lr_at(0.25, 10, c) == pytest.approx(1e-5 + 0.25 * (1e-3 - 1e-5))
    assert lr_at(1.0, 10, c) == pytest.approx(1e-3)  # end of warm-up: the peak


def test_cosine_midpoint_and_end():
    c = cfg()
    # warm-up 1 of 11 epochs: the cosine spans epochs 1..11, its midpoint is epoch 6
    assert lr_at(6.0, 11, c) == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5))
    assert lr_at(1.0 + 10 * 0.25, 11, c) == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5) * (1 + math.cos(math.pi / 4)))
    assert lr_at(11.0, 11, c) == pytest.approx(1e-5)
    assert lr_at(20.0, 11, c) == pytest.approx(1e-5)  # past the end it stays at min_lr


def test_step_and_constant_schedules():
    c = cfg(schedule="step", milestones=[3.0, 6.0], gamma=0.1, warmup_epochs=0.0)
    assert lr_at(2.99, 10, c) == pytest.approx(1e-3)
    assert lr_at(3.0, 10, c) == pytest.approx(1e-4)
    assert lr_at(7.0, 10, c) == pytest.approx(1e-5)
    assert lr_at(5.0, 10, cfg(schedule="constant")) == pytest.approx(1e-3)
    with pytest.raises(ValueError, match="unknown schedule"):
        lr_at(5.0, 10, cfg(schedule="linear"))


def test_budget_compressed_position_reaches_the_end_by_the_deadline():
    # No budget: the position is the epoch progress.
    assert schedule_position(2.5, 30, elapsed=100.0, budget_seconds=None) == 2.5
    # 8-minute budget, a quarter spent after 2 of 30 epochs: the schedule is a quarter through.
    assert schedule_position(2.0, 30, elapsed=120.0, budget_seconds=480.0) == pytest.approx(7.5)
    # When epochs are the tighter limit, progress wins.
    assert schedule_position(20.0, 30, elapsed=120.0, budget_seconds=480.0) == 20.0
    # At the deadline the cosine is at its end.
    c = cfg()
    assert lr_at(schedule_position(3.0, 30, 480.0, 480.0), 30, c) == pytest.approx(1e-5)


def test_masked_token_loss_by_hand():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0], [1.0, 1.0, 1.0]])
    labels = torch.tensor([0, -100, 1])  # the second position is not masked
    lse = lambda row: math.log(sum(math.exp(v) for v in row))  # noqa: E731
    expected = ((lse([2.0, 0.0, -1.0]) - 2.0) + (lse([1.0, 1.0, 1.0]) - 1.0)) / 2
    assert masked_token_loss(logits, labels).item() == pytest.approx(expected, rel=1e-6)
    empty = masked_token_loss(torch.zeros(0, 3, requires_grad=True), torch.zeros(0, dtype=torch.long))
    assert empty.item() == 0.0 and empty.requires_grad
