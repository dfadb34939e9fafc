"""train.ema: the moving average of the weights (tbps.engine.ema) and what a run keeps of it."""

import pytest
import torch
from torch import nn

from tbps.engine.ema import WeightAverage
from tbps.engine.train import TrainJob, train
from tbps.models.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from tbps.recipes.config import load_recipe


def test_the_average_follows_its_formula_and_swaps_in_and_out():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    avg = WeightAverage(model, decay=0.5)
    want = {n: p.detach().clone().double() for n, p in model.named_parameters()}
    for t in range(1, 6):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        avg.update(model)
        d = min(0.5, (1 + t) / (10 + t))  # the ramp, then the decay (from step 8 on for 0.9; here 0.5 throughout)
        want = {n: d * want[n] + (1 - d) * p.detach().double() for n, p in model.named_parameters()}
    assert avg.steps == 5
    for n, t in zip(avg.names, avg.tensors):
        assert torch.allclose(t.double(), want[n], atol=1e-6), n
    own = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(KeyError):
        with avg.swapped_in(model):
            assert all(torch.equal(p, t) for p, t in zip(model.parameters(), avg.tensors))
            raise KeyError("an evaluation that fails")
    assert all(torch.equal(p, own[n]) for n, p in model.named_parameters())  # the model's own weights back


def test_the_ramp_forgets_the_first_weights():
    model = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(100.0)
    avg = WeightAverage(model, decay=0.999)
    with torch.no_grad():
        model.weight.fill_(0.0)
    for _ in range(200):
        avg.update(model)
    # weight left on the start: prod (1 + t) / (10 + t) over t = 1..200 = 10! / (201 * ... * 210), about 3e-17
    assert avg.tensors[0].abs().item() < 1e-6


def test_a_bad_decay_or_a_foreign_state_is_refused():
    with pytest.raises(ValueError, match="train.ema"):
        WeightAverage(nn.Linear(2, 2), 1.0)
    with pytest.raises(ValueError, match="train.ema"):
        load_recipe("tbps-clip-cpu", ["train.ema=1.5"])
    avg = WeightAverage(nn.Linear(2, 2), 0.9)
    with pytest.raises(ValueError, match="not of this model"):
        avg.load_state_dict(WeightAverage(nn.Linear(2, 3), 0.9).state_dict())
    with pytest.raises(ValueError, match="decay"):
        avg.load_state_dict(WeightAverage(nn.Linear(2, 2), 0.8).state_dict())
    state = WeightAverage(nn.Linear(2, 2), 0.9).state_dict()
    avg.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(avg.tensors, state["tensors"].values()))


def _job(data, out, overrides, **kw):
    return TrainJob(data_root=str(data), recipe=load_recipe("tbps-clip-cpu", overrides), out_dir=str(out),
                    progress=False, **kw)


def test_a_run_keeps_the_average_in_best_pt_and_trains_as_without_it(tiny_dataset, micro_overrides, tmp_path):
    """The average never touches training (last.pt's weights are a run's without it, bit for bit);
    val evaluates it and best.pt holds it; last.pt holds it beside the online weights."""
    train(_job(tiny_dataset, tmp_path / "plain", micro_overrides, epochs=1))
    train(_job(tiny_dataset, tmp_path / "ema", micro_overrides + ["train.ema=0.9"], epochs=1))
    plain, last = load_checkpoint(tmp_path / "plain" / "last.pt"), load_checkpoint(tmp_path / "ema" / "last.pt")
    assert all(torch.equal(plain["model"][k], v) for k, v in last["model"].items())
    assert "ema" not in plain and last["ema"]["steps"] == last["global_step"] > 0
    best = load_checkpoint(tmp_path / "ema" / "best.pt")
    assert "ema" not in best  # for use: the average is its weights
    averaged = last["ema"]["tensors"]
    assert all(torch.equal(best["model"][k], v) for k, v in averaged.items())
    assert any(not torch.equal(last["model"][k], v) for k, v in averaged.items())
    # buffers are the model's own
    assert all(torch.equal(best["model"][k], v) for k, v in last["model"].items() if k not in averaged)


def test_a_resumed_run_continues_its_average_exactly(tiny_dataset, micro_overrides, tmp_path):
    over = micro_overrides + ["train.ema=0.9"]
    train(_job(tiny_dataset, tmp_path / "a", over, epochs=2))
    train(_job(tiny_dataset, tmp_path / "b", over, epochs=2, stop_after_epochs=1))
    train(_job(tiny_dataset, tmp_path / "b", over, resume=True))
    a, b = load_checkpoint(tmp_path / "a" / "last.pt"), load_checkpoint(tmp_path / "b" / "last.pt")
    assert a["ema"]["steps"] == b["ema"]["steps"] == a["global_step"]
    assert all(torch.equal(v, b["ema"]["tensors"][k]) for k, v in a["ema"]["tensors"].items())
    # a run continues with its own recipe: begun without the average, it goes on without one
    train(_job(tiny_dataset, tmp_path / "c", micro_overrides, epochs=2, stop_after_epochs=1))
    train(_job(tiny_dataset, tmp_path / "c", over, resume=True))
    assert "ema" not in load_checkpoint(tmp_path / "c" / "last.pt")
    # a last.pt whose recipe has the average but not the average: one line naming it
    train(_job(tiny_dataset, tmp_path / "d", over, epochs=2, stop_after_epochs=1))
    ck = load_checkpoint(tmp_path / "d" / "last.pt")
    save_checkpoint(tmp_path / "d" / "last.pt", {k: v for k, v in ck.items() if k not in ("ema", "path", "format", "version")})
    with pytest.raises(CheckpointError, match="last.pt: no weight average to resume"):
        train(_job(tiny_dataset, tmp_path / "d", over, resume=True))
