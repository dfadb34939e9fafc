"""Training stages placed by fractions of the run (tbps.recipes.stages): which stage is active at a
position, by step count and under a time budget; the learning rate at a switch (restarted or
continued); bad stages refused in one line naming the key; and real staged runs whose logged losses
change at the switch step."""

from __future__ import annotations

import math

import pytest
import torch

from tbps.engine.optim import schedule_position, staged_lr
from tbps.recipes.config import ConfigError, OptimConfig, load_recipe



# A base stage for the first half, then the recipe's losses (MLM on) at a fifth of the lr, restarted:
# the mechanism under test, whatever split and schedule irra-cpu ships with.
HALF = ["stages=[{start: 0.0, end: 0.5, losses: {mlm: {weight: 0.0}}}, {start: 0.5, lr_scale: 0.2}]",
        "optim.stage_schedule=restart"]


def test_fraction_stages_follow_the_run_length_and_epoch_stages_stay_put():
    r = load_recipe("irra-cpu", HALF)  # base stage [0, 0.5), then the recipe's losses
    for epochs in (30, 4, 1):  # the boundary moves with the run: every length keeps both stages
        half = 0.5 * epochs
        assert r.stage_at(0.0, epochs) == (0,) and r.stage_at(math.nextafter(half, 0), epochs) == (0,)
        assert r.stage_at(half, epochs) == (1,) and r.stage_at(epochs - 1e-9, epochs) == (1,)
        assert r.losses_at(math.nextafter(half, 0), epochs)["mlm"]["weight"] == 0.0
        assert r.losses_at(half, epochs)["mlm"]["weight"] == 1.0
    assert r.stage_at(7.0) == (0,) and r.stage_at(15.0) == (1,)  # default length: train.epochs (30)
    p = load_recipe("laip")  # the paper recipe: stages in epochs, whatever the run length
    assert p.stage_at(29.99, 45) == (0,) and p.stage_at(30.0, 45) == (1,) and p.stage_at(30.0, 100) == (1,)
    assert p.losses_at(29.0, 45)["mpm"]["weight"] == 0.0 and p.losses_at(31.0, 45)["mpm"]["weight"] == 1.0


def test_under_a_time_budget_the_fraction_is_the_share_of_the_budget_spent():
    r = load_recipe("mefa-cpu", ["stages=[{start: 0.0, end: 0.5}, {start: 0.5}]"])
    # 30 nominal epochs, 8-minute budget: after 1.2 real epochs and 4 of 8 minutes the run is half-way.
    assert r.stage_at(schedule_position(1.2, 30, elapsed=239.0, budget_seconds=480.0), 30) == (0,)
    assert r.stage_at(schedule_position(1.2, 30, elapsed=240.0, budget_seconds=480.0), 30) == (1,)
    # Steps are the tighter limit when the epochs run out first (16 of 30 epochs after 1 minute).
    assert r.stage_at(schedule_position(16.0, 30, elapsed=60.0, budget_seconds=480.0), 30) == (1,)


def test_learning_rate_at_the_switch_restarts_or_continues():
    stages = [{"start": 0.0, "end": 0.5}, {"start": 0.5, "lr_scale": 0.2}]
    c = OptimConfig(lr=1e-3, warmup_epochs=1.0, warmup_start_lr=1e-5, min_lr=1e-5, schedule="cosine",
                    stage_schedule="restart")
    # 10 epochs: segments [0, 5) and [5, 10); each warms up over 1 epoch, then a cosine to min_lr.
    assert staged_lr(0.0, 10, c, stages) == pytest.approx(1e-5)
    assert staged_lr(1.0, 10, c, stages) == pytest.approx(1e-3)
    assert staged_lr(3.0, 10, c, stages) == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5))  # cosine midpoint of 1..5
    assert staged_lr(5.0 - 1e-9, 10, c, stages) == pytest.approx(1e-5, rel=1e-6)  # the base stage has decayed
    assert staged_lr(5.0, 10, c, stages) == pytest.approx(0.2 * 1e-5)  # the switch: warm-up again, scaled
    assert staged_lr(6.0, 10, c, stages) == pytest.approx(0.2 * 1e-3)
    assert staged_lr(8.0, 10, c, stages) == pytest.approx(0.2 * (1e-5 + 0.5 * (1e-3 - 1e-5)))
    cont = OptimConfig(lr=1e-3, warmup_epochs=1.0, warmup_start_lr=1e-5, min_lr=1e-5, schedule="cosine")
    mid = 1e-5 + 0.5 * (1e-3 - 1e-5) * (1 + math.cos(math.pi * 4 / 9))  # one cosine over 1..10, at 5
    assert staged_lr(5.0 - 1e-9, 10, cont, stages) == pytest.approx(mid)
    assert staged_lr(5.0, 10, cont, stages) == pytest.approx(0.2 * mid)  # continued, only scaled
    assert staged_lr(5.0, 10, cont, []) == pytest.approx(mid)


@pytest.mark.parametrize("stages, key", [
    ("[{start: 0.5, end: 1.5}]", "stages[0].end"),
    ("[{start: -0.1}]", "stages[0].start"),
    ("[{start: 0.6, end: 0.4}]", "stages[0].end"),
    ("[{start: 1.0}]", "stages[0].start"),
    ("[{start: 0.0, end: 0.5}, {start_epoch: 3}]", "stages[1]"),
    ("[{start: 0.2, start_epoch: 3}]", "stages[0]"),
    ("[{start: 0.5, lr_scale: 0}]", "stages[0].lr_scale"),
    ("[{start: 0.5, lr_scale: nan}]", "stages[0].lr_scale"),
    ("[{begin: 0.5}]", "stages[0]"),
])
def test_bad_stages_are_one_line_naming_the_key(stages, key):
    with pytest.raises(ConfigError) as e:
        load_recipe("irra-cpu", [f"stages={stages}"])
    msg = str(e.value)
    assert msg.startswith(key) and "\n" not in msg
    with pytest.raises(ConfigError, match="optim.stage_schedule"):
        load_recipe("irra-cpu", ["optim.stage_schedule=sometimes"])


class _Rows(list):
    per_epoch = None

    def __init__(self):
        super().__init__()
        self.per_epoch = [0]


def _spy_steps(monkeypatch):
    """Record (step, the *_loss keys the objective returned, lr) for every optimiser step, and the
    run's steps per epoch (``rows.per_epoch[0]``)."""
    import tbps.engine.epoch as epoch_mod

    rows, step = _Rows(), epoch_mod._step
    per_epoch = rows.per_epoch

    def spy(loop, batch, progress):
        out, loss, lr = step(loop, batch, progress)
        rows.append((loop.global_step, sorted(k for k in out if k.endswith("_loss")), lr))
        per_epoch[0] = loop.steps_per_epoch
        return out, loss, lr

    monkeypatch.setattr(epoch_mod, "_step", spy)
    return rows


def test_staged_run_switches_losses_mid_epoch_at_the_fraction(tiny_dataset, micro_overrides, tmp_path, monkeypatch,
                                                               capsys):
    from tbps.engine.train import TrainJob, train

    rows = _spy_steps(monkeypatch)
    r = load_recipe("irra-cpu", micro_overrides + HALF + ["losses.fusion.width=32", "losses.fusion.heads=2",
                                                          "optim.warmup_epochs=0.5", "data.batch_size=16"])
    res = train(TrainJob(str(tiny_dataset), r, str(tmp_path / "run"), epochs=1, progress=False))
    total = res["global_step"]
    # One epoch's batches exactly once: the loader rebuilt at the switch continues where it stopped.
    assert res["finished"] and total >= 4 and len(rows) == total == rows.per_epoch[0]
    switch = math.ceil(0.5 * total)  # the first step whose position is >= half the run
    assert [s for s, _, _ in rows] == list(range(total))
    assert all(keys == ["id_loss", "sdm_loss"] for s, keys, _ in rows if s < switch)
    assert all(keys == ["id_loss", "mlm_loss", "sdm_loss"] for s, keys, _ in rows if s >= switch)
    # The schedule restarts at the switch: its warm-up start, scaled by the stage's lr_scale.
    assert rows[switch][2] == pytest.approx(0.2 * r.optim.warmup_start_lr)
    assert rows[switch - 1][2] > rows[switch][2]
    assert f"stage 2 of 2 from step {switch}" in capsys.readouterr().err


def test_under_a_budget_the_switch_follows_the_budget_clock(tiny_dataset, micro_overrides, tmp_path, monkeypatch):
    """A run of 2 epochs under a 1-minute budget whose clock reads 10 s per step: half the budget
    is spent after step 3, before half the steps; the losses switch there."""
    from tbps.engine.epoch import Loop
    from tbps.engine.train import TrainJob, train

    monkeypatch.setattr(Loop, "elapsed", lambda self: 10.0 * self.global_step)
    rows = _spy_steps(monkeypatch)
    r = load_recipe("tbps-clip-cpu", micro_overrides + ["data.batch_size=16",
        "stages=[{start: 0.0, end: 0.5, losses: {citc: {weight: 0.0}}}, {start: 0.5}]"])
    res = train(TrainJob(str(tiny_dataset), r, str(tmp_path / "run"), epochs=2, time_budget=1.0, progress=False))
    assert res["global_step"] >= 8  # half the steps lies after step 3
    assert [keys for _, keys, _ in rows[:3]] == [["nitc_loss", "ritc_loss"]] * 3
    assert all(keys == ["citc_loss", "nitc_loss", "ritc_loss"] for _, keys, _ in rows[3:])


def _stopped_and_resumed(data, recipe, out):
    """Two epochs of ``recipe`` into ``out``, stopped after the first and resumed: both summaries."""
    from tbps.engine.train import TrainJob, train

    def job(**kw):
        return TrainJob(str(data), recipe, str(out), epochs=2, progress=False, **kw)

    return train(job(stop_after_epochs=1)), train(job(resume=True))


@pytest.mark.parametrize("split", [0.5, 0.25])
def test_fresh_optimizer_clears_the_moments_once_at_the_switch_across_a_resume(
        tiny_dataset, micro_overrides, tmp_path, capsys, split):
    """``fresh_optimizer: true``: AdamW's state starts again when the run enters the stage, once. A run
    stopped after epoch 1 of 2 and resumed either still has the switch ahead (split 0.5: the resumed
    process clears) or behind it (0.25: the resumed process must not clear again)."""
    from tbps.engine.train import TrainJob, train
    from tbps.models.checkpoint import load_checkpoint

    r = load_recipe("irra-cpu", micro_overrides + [
        "losses.fusion.width=32", "losses.fusion.heads=2", "data.batch_size=16",
        f"stages=[{{start: 0.0, end: {split}, losses: {{mlm: {{weight: 0.0}}}}}}, "
        f"{{start: {split}, fresh_optimizer: true}}]"])
    out = tmp_path / "run"
    first, res = _stopped_and_resumed(tiny_dataset, r, out)
    total = res["global_step"]
    assert res["finished"] and total == 2 * first["global_step"]
    switch = math.ceil(split * total)
    err = capsys.readouterr().err
    assert err.count("optimiser state cleared") == 1 and f"stage 2 of 2 from step {switch}" in err
    state = load_checkpoint(out / "last.pt")["optimizer"]["state"]
    steps = {int(s["step"]) for s in state.values()}
    # the visual trunk and the SDM terms train at every step: their moments count from the switch
    assert total - switch in steps and max(steps) == total - switch
    # without the key the moments run through the switch
    r = load_recipe("irra-cpu", micro_overrides + ["losses.fusion.width=32", "losses.fusion.heads=2",
                                                   "data.batch_size=16", *HALF])
    train(TrainJob(str(tiny_dataset), r, str(tmp_path / "plain"), epochs=2, progress=False))
    state = load_checkpoint(tmp_path / "plain" / "last.pt")["optimizer"]["state"]
    assert max(int(s["step"]) for s in state.values()) == total
    with pytest.raises(ConfigError, match=r"^stages\[1\]\.fresh_optimizer: true or false"):
        load_recipe("irra-cpu", ["stages=[{start: 0.0, end: 0.5}, {start: 0.5, fresh_optimizer: 2}]"])


@pytest.mark.parametrize("epochs", [1, 2])  # the switch mid-epoch, and on the boundary between epochs
def test_a_run_stopped_at_the_switch_forks_into_the_staged_and_the_base_arm(tiny_dataset, micro_overrides, tmp_path,
                                                                          monkeypatch, epochs):
    """``stop_at_stage_switch``: the run stops where stage 2 begins with last.pt saved there; resumed as
    it is, it ends bit-identical to the run never stopped; resumed with the base recipe written into
    its last.pt (``stages=[]``, MLM off), it trains the same remaining steps on the base losses."""
    import shutil

    from tbps.engine.train import TrainJob, train
    from tbps.models.checkpoint import load_checkpoint, save_checkpoint

    common = micro_overrides + ["losses.fusion.width=32", "losses.fusion.heads=2", "data.batch_size=16"]
    staged, base = load_recipe("irra-cpu", common + HALF), load_recipe("irra-cpu", common + ["stages=[]",
                                                                                              "losses.mlm.weight=0"])

    def job(recipe, out, **kw):
        return TrainJob(str(tiny_dataset), recipe, str(tmp_path / out), epochs=epochs, progress=False, **kw)

    whole = train(job(staged, "whole"))
    total = whole["global_step"]
    switch = math.ceil(0.5 * total)
    trunk = train(job(staged, "trunk", stop_at_stage_switch=True))
    assert trunk["global_step"] == switch and not trunk["finished"]
    ck = load_checkpoint(tmp_path / "trunk" / "last.pt")
    assert ck["global_step"] == switch and ck["stage"] == [0]
    shutil.copytree(tmp_path / "trunk", tmp_path / "staged")
    shutil.copytree(tmp_path / "trunk", tmp_path / "base")
    save_checkpoint(tmp_path / "base" / "last.pt", {**ck, "recipe": base.to_dict()})

    assert train(job(staged, "staged", resume=True))["global_step"] == total
    for name in ("model", "objective"):
        a, b = (load_checkpoint(tmp_path / d / "last.pt")[name] for d in ("whole", "staged"))
        assert all(torch.equal(a[k], b[k]) for k in a), name
    rows = _spy_steps(monkeypatch)
    assert train(job(base, "base", resume=True))["global_step"] == total
    assert [s for s, _, _ in rows] == list(range(switch, total))
    assert all(keys == ["id_loss", "sdm_loss"] for _, keys, _ in rows)
    assert load_checkpoint(tmp_path / "base" / "last.pt")["recipe"]["stages"] == []


def test_a_run_stopped_at_the_switch_does_not_cross_it_when_the_clock_passes_it_between_epochs(
        tiny_dataset, micro_overrides, tmp_path, monkeypatch):
    """Under a time budget the switch can fall between an epoch's end and the next epoch's first step
    (the check of the free cores between them takes a moment). The run must still stop before any step
    of the next stage: one reading of the clock decides both the stop and the stage trained on. (Before
    the fix, the stop check read the clock before the switch and the next epoch's setup after it, so the
    trunk trained on into the next stage and never stopped.)"""
    import tbps.engine.train as train_mod
    from tbps.engine.epoch import Loop
    from tbps.engine.train import TrainJob, train
    from tbps.models.checkpoint import load_checkpoint

    clock = {"s": 0.0}  # the budget clock, as the schedule and the stages read it: still at 0 s after epoch 1
    monkeypatch.setattr(Loop, "elapsed", lambda self: clock["s"])
    monkeypatch.setattr(train_mod, "_adapt_threads", lambda loop: clock.update(s=50.0))  # 50 of 60 s: past 0.75
    rows = _spy_steps(monkeypatch)
    r = load_recipe("tbps-clip-cpu", micro_overrides + ["data.batch_size=16",
        "stages=[{start: 0.0, end: 0.75, losses: {citc: {weight: 0.0}}}, {start: 0.75}]"])
    res = train(TrainJob(str(tiny_dataset), r, str(tmp_path / "trunk"), epochs=2, time_budget=1.0, progress=False,
                         stop_at_stage_switch=True))
    per_epoch = rows.per_epoch[0]
    # Epoch 2's first step was set up at the position read before the clock jumped (the first stage), then the
    # switch was seen and the run stopped there, every step on the first stage's losses.
    assert not res["finished"] and res["global_step"] == per_epoch + 1
    assert [keys for _, keys, _ in rows] == [["nitc_loss", "ritc_loss"]] * (per_epoch + 1)
    ck = load_checkpoint(tmp_path / "trunk" / "last.pt")
    assert ck["global_step"] == per_epoch + 1 and ck["stage"] == [0]


@pytest.mark.parametrize("split", [0.5, 0.25])
def test_fresh_modules_start_again_once_at_the_switch_across_a_resume(tiny_dataset, micro_overrides, tmp_path,
                                                                      capsys, split):
    """``fresh_modules: [objective.fusion]``: the fusion encoder is re-initialised when the run enters the
    stage, once, and only its optimiser state starts again; a run resumed after the switch (0.25) must not
    reset it a second time, one resumed before it (0.5) must."""
    from tbps.models.checkpoint import load_checkpoint

    r = load_recipe("irra-cpu", micro_overrides + [
        "losses.fusion.width=32", "losses.fusion.heads=2", "data.batch_size=16",
        f"stages=[{{start: 0.0, end: {split}}}, {{start: {split}, fresh_modules: [objective.fusion]}}]"])
    out = tmp_path / "run"
    first, res = _stopped_and_resumed(tiny_dataset, r, out)
    total = res["global_step"]
    switch = math.ceil(split * total)
    err = capsys.readouterr().err
    assert err.count("re-initialised objective.fusion") == 1 and f"stage 2 of 2 from step {switch}" in err
    assert total == 2 * first["global_step"]
    ck = load_checkpoint(out / "last.pt")
    steps = [int(s["step"]) for s in ck["optimizer"]["state"].values()]
    fusion = sum(1 for k in ck["objective"] if k.startswith("fusion."))
    # MLM trains the fusion encoder at every step: its moments count from the switch, every other one's
    # from the start
    reset = sum(s == total - switch for s in steps)
    assert set(steps) == {total - switch, total} and 0 < reset <= fusion


def test_fresh_modules_reset_the_named_submodule_and_its_moments_only():
    from torch import nn

    from tbps.engine.distributed import DistInfo
    from tbps.engine.fresh_modules import check, reinitialise

    root = nn.Module()
    root.model = nn.Linear(4, 4)
    root.objective = nn.Module()
    root.objective.fusion = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    opt = torch.optim.AdamW(root.parameters())
    loss = root.objective.fusion(root.model(torch.randn(3, 4))).square().sum()
    loss.backward()
    opt.step()
    with torch.no_grad():
        for p in root.parameters():
            p.fill_(7.0)
    check(root, [{"start": 0.5, "fresh_modules": ["objective.fusion"]}], weight_average=False)
    assert reinitialise(root, ["objective.fusion"], opt, DistInfo()) == 4
    lin, norm = root.objective.fusion
    assert not (lin.weight == 7.0).any() and (norm.weight == 1.0).all() and (norm.bias == 0.0).all()
    assert (root.model.weight == 7.0).all()  # outside the path: untouched, its moments kept
    assert set(opt.state) == {root.model.weight, root.model.bias}

    class Raw(nn.Module):  # parameters of its own, and no way to start them again
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(4))

    root.objective.raw = Raw()
    with pytest.raises(ConfigError, match=r"^stages\[0\]\.fresh_modules: objective\.raw: objective\.raw \(Raw\) "
                                          r"holds parameters but has no reset_parameters"):
        check(root, [{"start": 0.5, "fresh_modules": ["objective.raw"]}], weight_average=False)
    with pytest.raises(ConfigError, match=r"^stages\[1\]\.fresh_modules: objective\.fusio is not a submodule of the run "
                                          r"\(objective holds objective\.fusion, objective\.raw\)$"):
        check(root, [{}, {"start": 0.5, "fresh_modules": ["objective.fusio"]}], weight_average=False)
    with pytest.raises(ConfigError, match=r"not with train\.ema"):
        check(root, [{"start": 0.5, "fresh_modules": ["model"]}], weight_average=True)
    with pytest.raises(ConfigError, match=r"^stages\[1\]\.fresh_modules: a list of submodule paths"):
        load_recipe("irra-cpu", ["stages=[{start: 0.0, end: 0.5}, {start: 0.5, fresh_modules: objective.fusion}]"])
