"""End-to-end training through the real entry points, resume, time budget and eval CLI."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from tbps.cli.main import main
from tbps.recipes.config import list_recipes, load_recipe
from tbps.models.checkpoint import load_checkpoint
from tbps.engine.train import TrainJob, train


def _job(data, out, overrides, **kw):
    return TrainJob(data_root=str(data), recipe=load_recipe("tbps-clip-cpu", overrides), out_dir=str(out),
                    progress=False, **kw)


def _same_weights(a, b):
    sa, sb = load_checkpoint(a)["model"], load_checkpoint(b)["model"]
    return all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def trained_run(tiny_dataset, tmp_path_factory):
    from tests.conftest import MICRO

    out = tmp_path_factory.mktemp("run")
    summary = train(_job(tiny_dataset, out, MICRO + ["optim.lr=2e-3", "optim.warmup_epochs=0.5"], epochs=5))
    return out, summary


def test_train_writes_run_files_and_learns(trained_run):
    out, summary = trained_run
    for name in ("last.pt", "best.pt", "config.yaml", "metrics.jsonl", "metrics.csv"):
        assert (out / name).exists(), name
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 5 and rows[-1]["epoch"] == 5
    best = load_checkpoint(out / "best.pt")
    assert "optimizer" not in best  # best.pt is for use, last.pt for resuming
    assert summary["best_info"]["metric"] == "val t2i R1"
    # Chosen on val: the best row is the max of (R1, mAP) on val.
    top = max(rows, key=lambda r: (r["val_t2i_R1"], r["val_t2i_mAP"]))
    assert summary["best_info"]["epoch"] == top["epoch"]
    # It learns: val mAP rises over training.
    first = rows[0]["val_t2i_mAP"]
    assert max(r["val_t2i_mAP"] for r in rows) > first


def test_resume_after_a_validation_continues_history_and_best_exactly(tiny_dataset, micro_overrides, tmp_path,
                                                                      monkeypatch):
    """Stopped after epoch 1's validation and last.pt, or killed between epoch 2's validation (and
    best.pt) and its last.pt: the resumed run's metrics files, best.pt and last.pt equal an
    uninterrupted run's. The val R1 is scripted per epoch (60, 10) so that epoch 1 stays the
    best: a resumed run that forgot the best so far would take epoch 2's weights."""
    import tbps.engine.evaluate as ev
    from tbps.engine.runlog import RunLog

    script, at = {1: 60.0, 2: 10.0}, {}
    real_eval, real_log_eval, real_save = ev.evaluate, RunLog.evaluate, RunLog.save_last

    def scripted_eval(*a, **k):
        res = real_eval(*a, **k)
        res.metrics["t2i"]["R1"] = script[at["epoch"]]
        return res

    def log_eval(self, loop, epoch_progress):
        at["epoch"] = epoch_progress
        return real_log_eval(self, loop, epoch_progress)

    monkeypatch.setattr(ev, "evaluate", scripted_eval)
    monkeypatch.setattr(RunLog, "evaluate", log_eval)
    train(_job(tiny_dataset, tmp_path / "a", micro_overrides, epochs=2))

    train(_job(tiny_dataset, tmp_path / "b", micro_overrides, epochs=2, stop_after_epochs=1))
    assert load_checkpoint(tmp_path / "b" / "last.pt")["epoch"] == 1
    b_summary = train(_job(tiny_dataset, tmp_path / "b", micro_overrides, resume=True))

    class Killed(BaseException):
        pass

    def save_or_die(self, loop, epoch, step):
        if epoch == 2:
            raise Killed  # after epoch 2's validation (best.pt, history row), before its last.pt
        real_save(self, loop, epoch, step)

    monkeypatch.setattr(RunLog, "save_last", save_or_die)
    with pytest.raises(Killed):
        train(_job(tiny_dataset, tmp_path / "c", micro_overrides, epochs=2))
    monkeypatch.setattr(RunLog, "save_last", real_save)
    assert load_checkpoint(tmp_path / "c" / "last.pt")["epoch"] == 1
    c_summary = train(_job(tiny_dataset, tmp_path / "c", micro_overrides, resume=True))

    a = tmp_path / "a"
    rows = (a / "metrics.jsonl").read_text()
    assert [json.loads(r)["val_t2i_R1"] for r in rows.splitlines()] == [60.0, 10.0]
    assert load_checkpoint(a / "best.pt")["epoch"] == 1
    for run, summary in ((tmp_path / "b", b_summary), (tmp_path / "c", c_summary)):
        assert (run / "metrics.jsonl").read_text() == rows
        assert (run / "metrics.csv").read_text() == (a / "metrics.csv").read_text()
        assert summary["best_info"]["epoch"] == 1 and summary["best_info"]["score"] == 60.0
        assert _same_weights(a / "best.pt", run / "best.pt")
        assert _same_weights(a / "last.pt", run / "last.pt")


def test_time_budget_stops_mid_epoch_saves_evaluates_and_resumes_exactly(tiny_dataset, micro_overrides, tmp_path,
                                                                         capsys):
    over = micro_overrides + ["train.budget_schedule=false"]
    train(_job(tiny_dataset, tmp_path / "a", over, epochs=1))
    s = train(_job(tiny_dataset, tmp_path / "b", over, epochs=1, time_budget=1e-6))
    assert s["stopped_by_budget"] and not s["finished"]
    # the run says how much training the budget bought
    assert s["global_step"] == 1 and s["epochs_trained"] == round(1 / s["total_steps"], 3)
    assert f"time budget of 1e-06 min spent after 1 steps (epoch {1 / s['total_steps']:.2f} of 1; the full run " \
           f"is {s['total_steps']} steps)" in capsys.readouterr().err
    ck = load_checkpoint(tmp_path / "b" / "last.pt")
    assert (ck["epoch"], ck["step_in_epoch"]) == (0, 1)  # stopped after one step
    assert (tmp_path / "b" / "best.pt").exists()  # evaluated on val and saved
    train(_job(tiny_dataset, tmp_path / "b", over, resume=True))
    assert _same_weights(tmp_path / "a" / "last.pt", tmp_path / "b" / "last.pt")


def test_a_resumed_run_counts_its_earlier_time_against_the_budget(tiny_dataset, micro_overrides, tmp_path):
    """The budget is the whole run's, as the schedule that reads it is: a run resumed with an hour
    behind it and a one-minute budget stops after its first step, not a minute later."""
    from tbps.models.checkpoint import save_checkpoint

    s = train(_job(tiny_dataset, tmp_path / "b", micro_overrides, epochs=1, time_budget=1e-6))
    assert s["global_step"] == 1 and s["total_steps"] > 2
    ck = load_checkpoint(tmp_path / "b" / "last.pt")
    save_checkpoint(tmp_path / "b" / "last.pt", {**ck, "elapsed": 3600.0})
    r = train(_job(tiny_dataset, tmp_path / "b", micro_overrides, time_budget=1.0, resume=True))
    assert r["stopped_by_budget"] and r["global_step"] == 2 and r["elapsed_s"] >= 3600.0


@pytest.mark.slow
def test_killed_process_resumes_to_the_same_result(tiny_dataset, tmp_path):
    """A real SIGKILL mid-run, then `tbps train --resume`: same weights as an uninterrupted run."""
    from tests.conftest import MICRO

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = lambda out: [sys.executable, "-m", "tbps.cli.main", "train", "--data", str(tiny_dataset),  # noqa: E731
                       "--out", str(out), "--epochs", "4", "--no-progress", *MICRO]
    subprocess.run(cmd(tmp_path / "a"), env=env, check=True, capture_output=True)
    proc = subprocess.Popen(cmd(tmp_path / "b"), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = tmp_path / "b" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 1):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = load_checkpoint(tmp_path / "b" / "last.pt")["epoch"]
    assert 1 <= killed_at < 4, killed_at
    resumed = subprocess.run([sys.executable, "-m", "tbps.cli.main", "train", "--resume", str(tmp_path / "b"),
                              "--no-progress"], env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert _same_weights(tmp_path / "a" / "last.pt", tmp_path / "b" / "last.pt")


def test_eval_cli_json_and_table(trained_run, tiny_dataset, capsys):
    run, _ = trained_run
    assert main(["eval", str(run / "best.pt"), "--data", str(tiny_dataset), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert set(res) == {"t2i", "i2t", "queries", "gallery"}
    assert set(res["t2i"]) == {"R1", "R5", "R10", "mAP", "mINP"}
    assert res["gallery"] > 0 and res["queries"] == 2 * res["gallery"]  # two captions per image
    assert 0 <= res["t2i"]["R1"] <= res["t2i"]["R5"] <= res["t2i"]["R10"] <= 100
    assert main(["eval", str(run), "--data", str(tiny_dataset)]) == 0  # run folder -> best.pt
    assert "text->image" in capsys.readouterr().out


def test_user_errors_are_one_line(tmp_path, capsys):
    assert main(["eval", str(tmp_path / "missing.pt"), "--data", str(tmp_path)]) == 2
    assert "no such checkpoint" in capsys.readouterr().err
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    assert main(["eval", str(tmp_path / "junk.pt"), "--data", str(tmp_path)]) == 2
    assert "cannot be read as a checkpoint" in capsys.readouterr().err
    assert main(["train", "--data", str(tmp_path), "--recipe", "nope"]) == 2
    assert "no recipe 'nope'" in capsys.readouterr().err


def test_list_recipes_shows_each_with_its_description_and_no_parts(capsys):
    assert main(["train", "--list-recipes"]) == 0
    rows = dict(line.split(None, 1) for line in capsys.readouterr().out.splitlines())
    assert set(rows) == set(list_recipes()) and "_cpu-settings" not in rows
    assert rows["irra-cpu"] == load_recipe("irra-cpu").description == "IRRA (SDM + ID + MLM) on a tiny ViT for CPU"


def test_cpu_budget_counts_compute_not_waiting():
    """A CPU-time budget is not spent by sleeping (a shared machine's waits), a wall budget is."""
    import time

    from tbps.engine.runtime import Budget

    wall, cpu = Budget(0.2 / 60, "wall"), Budget(0.2 / 60, "cpu")
    time.sleep(0.3)
    assert wall.spent() and not cpu.spent()
    t0 = time.monotonic()
    while not cpu.spent():  # burn CPU until the budget is gone
        sum(range(10_000))
        assert time.monotonic() - t0 < 10
    assert cpu.elapsed() >= 0.2
    with pytest.raises(ValueError, match="clock"):
        Budget(1.0, "gpu")


def _same_stem_as_the_run() -> str:
    """The trained run's image stem (the default recipe's) for a recipe fine-tuned from it."""
    return f"model.conv_stem={load_recipe('tbps-clip-cpu').model.conv_stem}"


def test_init_fine_tunes_from_another_runs_weights(trained_run, tiny_dataset, tmp_path, capsys):
    """--init: a new run (here MeFa) starts from a trained run's weights; modules the checkpoint
    lacks (the refiner) start fresh; the optimiser and epochs start anew."""
    from tests.conftest import MICRO

    run, _ = trained_run
    frozen = ["optim.lr=0", "optim.warmup_start_lr=0", "optim.min_lr=0", "losses.imr_text.weight=0",
              "losses.imr_image.weight=0", "losses.dcc.weight=0",  # lr 0: the weights stay as loaded
              _same_stem_as_the_run()]
    train(TrainJob(data_root=str(tiny_dataset), recipe=load_recipe("mefa-cpu", MICRO + frozen),
                   out_dir=str(tmp_path / "ft"), epochs=1, init_from=str(run / "best.pt"), progress=False))
    err = capsys.readouterr().err
    assert "initialised from" in err and "new here (fresh init, e.g. refiner." in err
    src, ft = load_checkpoint(run / "best.pt"), load_checkpoint(tmp_path / "ft" / "last.pt")
    assert set(src["model"]) == set(ft["model"])
    assert all(torch.equal(src["model"][k], ft["model"][k]) for k in src["model"])
    assert ft["epoch"] == 1  # a new run's counters, not the source's
    assert len((tmp_path / "ft" / "metrics.jsonl").read_text().splitlines()) == 1
    assert ft["global_step"] < src["global_step"]
    assert any(k.startswith("refiner.") for k in ft["objective"])  # fresh module, trained from here on
    assert "init_from" in (tmp_path / "ft" / "config.yaml").read_text()
    # Another architecture's checkpoint is refused by name (one line, exit 2), not loaded half-way.
    assert main(["train", "--data", str(tiny_dataset), "--recipe", "tbps-clip-cpu", "--out", str(tmp_path / "bad"),
                 "--init", str(run / "best.pt"), "--no-progress", *MICRO, "model.context_length=24"]) == 2
    assert "differ in shape" in capsys.readouterr().err and not (tmp_path / "bad" / "last.pt").exists()
    # Another image stem (the run has tbps-clip-cpu's convolutional stem, this one the ViT's patch projection)
    # is refused with the setting to give, not loaded around a first layer that starts from scratch.
    assert main(["train", "--data", str(tiny_dataset), "--recipe", "laip-cpu", "--out", str(tmp_path / "stem"),
                 "--init", str(run / "best.pt"), "--no-progress", *MICRO, "model.conv_stem=null"]) == 2
    err = capsys.readouterr().err
    assert "its image stem is model.conv_stem=[" in err and "this run's is model.conv_stem=null" in err
    assert not (tmp_path / "stem" / "last.pt").exists()
    assert main(["train", "--data", str(tiny_dataset), "--init", str(tmp_path / "none.pt")]) == 2
    assert "no such checkpoint" in capsys.readouterr().err


def test_init_also_resets_the_momentum_copies(trained_run, tiny_dataset, tmp_path):
    """--init into an objective with a momentum encoder (LAIP's ALBEF-style ITC queue): the momentum
    copy starts equal to the loaded weights, not to the random model the objective was built from
    (with lr 0 the EMA then keeps it equal)."""
    from tests.conftest import MICRO

    run, _ = trained_run
    frozen = ["optim.lr=0", "optim.warmup_start_lr=0", "optim.min_lr=0", "losses.fusion.width=32",
              "losses.fusion.heads=2", "losses.itc.queue_size=16", _same_stem_as_the_run()]
    train(TrainJob(data_root=str(tiny_dataset), recipe=load_recipe("laip-cpu", MICRO + frozen),
                   out_dir=str(tmp_path / "ft"), epochs=1, init_from=str(run / "best.pt"), progress=False))
    src, ft = load_checkpoint(run / "best.pt"), load_checkpoint(tmp_path / "ft" / "last.pt")
    copy = {k.removeprefix("momentum.module."): v for k, v in ft["objective"].items()
            if k.startswith("momentum.module.")}
    assert copy and set(copy) == set(src["model"])
    assert all(torch.allclose(copy[k].float(), src["model"][k].float()) for k in copy)


def test_a_dataloader_worker_trains_exactly_as_the_main_process(tiny_dataset, micro_overrides, tmp_path):
    """Moving the data pipeline into a DataLoader worker (data.num_workers) changes where batches are
    made, not what is learnt: each sample's augmentation is seeded by (seed, epoch, index) and the main
    process's RNG is left as it was either way, so the weights equal an in-process run's bit for bit.
    Dropout on, so that a data path that touched the main RNG would show."""
    over = [*micro_overrides, "model.text_attn_dropout=0.2", "data.augment.num_ops=3"]
    for workers in (0, 1):
        train(_job(tiny_dataset, tmp_path / f"w{workers}", [*over, f"data.num_workers={workers}"], epochs=2))
    assert _same_weights(tmp_path / "w0" / "last.pt", tmp_path / "w1" / "last.pt")


def test_train_compile_trains_like_the_uncompiled_run(tiny_dataset, micro_overrides, tmp_path, capsys):
    """train.compile=true: after an epoch (its val evaluation running the compiled towers in eval mode)
    the same weights as the uncompiled run up to float rounding, under the same state-dict keys."""
    runs = {}
    for compiled in (False, True):
        out = tmp_path / f"compile-{compiled}"
        runs[compiled] = train(_job(tiny_dataset, out, micro_overrides + [f"train.compile={str(compiled).lower()}"],
                                    epochs=1))
    assert "compiling clip.visual.transformer, clip.transformer at the first step" in capsys.readouterr().err
    a, b = load_checkpoint(runs[False]["last"])["model"], load_checkpoint(runs[True]["last"])["model"]
    assert list(a) == list(b)
    for k in a:
        if k.endswith("attn.in_proj_bias"):
            # The key bias's gradient is zero in exact arithmetic (a bias shared by every key leaves the
            # softmax unchanged): Adam turns each run's rounding noise there into lr-sized steps. So
            # compare the query and value biases only.
            q, _, v = a[k].chunk(3)
            qc, _, vc = b[k].chunk(3)
            a[k], b[k] = torch.cat([q, v]), torch.cat([qc, vc])
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6, msg=k)
