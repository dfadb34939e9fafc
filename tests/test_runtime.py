"""What a run needs of the machine: the time left (Eta) and its wording, against hand computations."""

import pytest

from tbps.engine.runtime import Eta, format_duration


class FakeClock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def test_eta_times_from_after_the_skipped_steps_and_reports_once():
    clock = FakeClock()
    eta = Eta(total_steps=600, first_step=0, skip=5, clock=clock)
    eta.tick(3)  # still in the untimed warm-up
    assert eta.seconds_left(3) is None and eta.line(3) is None
    clock.t += 50.0  # a slow first batch: must not count
    eta.tick(5)  # timing starts here
    clock.t += 10.0
    eta.tick(15)  # 10 steps in 10 s: 1 s/step, 585 steps left
    assert eta.seconds_left(15) == pytest.approx(585.0)
    assert eta.first_report(15) is None  # fewer than 20 timed steps
    clock.t += 10.0
    eta.tick(25)
    assert eta.first_report(25) == "step 25/600, 1.00 s/step, about 9 min 35 s left"
    assert eta.first_report(35) is None  # once only
    assert eta.seconds_left(700) == 0.0  # past the end: nothing left, never negative


def test_eta_of_a_resumed_run_counts_from_where_it_resumed():
    clock = FakeClock()
    eta = Eta(total_steps=100, first_step=60, skip=0, clock=clock)
    eta.tick(60)
    clock.t += 20.0
    assert eta.seconds_left(80) == pytest.approx(20.0)  # 20 steps in 20 s, 20 to go


def test_eta_under_a_time_budget_says_where_the_budget_stops_the_run():
    clock = FakeClock()
    eta = Eta(total_steps=1000, skip=0, clock=clock)
    eta.tick(0)
    clock.t += 40.0
    # 2 s/step: 980 steps, 1960 s to go, but the budget ends the run in 60 s, 30 steps later
    assert eta.line(20, limit=60.0) == ("step 20/1000, 2.00 s/step: the time budget ends the run in 1 min 0 s, "
                                        "about step 50")
    assert eta.line(20, limit=5000.0) == "step 20/1000, 2.00 s/step, about 32 min 40 s left"


@pytest.mark.parametrize("seconds,text", [(0.4, "0 s"), (59.6, "1 min 0 s"), (75.4, "1 min 15 s"),
                                          (3599, "59 min 59 s"), (3600 + 5 * 60 + 7, "1 h 05 min")])
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


@pytest.mark.parametrize("requested,cores,workers,world,busy,want", [
    (3, 2, 0, 1, 1.9, 3),    # asked for: kept, whatever the load
    (0, 2, 0, 1, 0.0, 2),    # idle 2 cores: both
    (0, 2, 0, 1, 0.4, 2),    # a little background work rounds away
    (0, 2, 0, 1, 0.6, 1),    # most of a core taken: one thread
    (0, 2, 0, 1, 1.0, 1),    # one competing process
    (0, 2, 0, 1, 7.5, 1),    # a crowded machine: never fewer than one
    (0, 8, 2, 1, 0.0, 6),    # DataLoader workers keep their cores
    (0, 8, 0, 2, 0.0, 4),    # two ranks share the machine
    (0, 8, 0, 1, 5.2, 3),    # 2.8 cores free
])
def test_choose_threads_fits_the_free_cores(requested, cores, workers, world, busy, want):
    from tbps.engine.runtime import choose_threads

    assert choose_threads(requested, cores, workers, world, busy) == want


def test_busy_cores_from_two_proc_stat_readings():
    from tbps.engine.runtime import busy_cores

    # user nice system idle iowait irq softirq steal (guest columns not summed)
    before = "cpu  100 0 50 800 50 0 0 0 0 0\ncpu0 50 0 25 400 25 0 0 0 0 0\ncpu1 50 0 25 400 25 0 0 0 0 0\nintr 1\n"
    after = "cpu  250 10 90 900 50 0 0 0 5 0\ncpu0 1 0 0 0 0 0 0 0 0 0\ncpu1 1 0 0 0 0 0 0 0 0 0\nintr 2\n"
    # 300 jiffies passed, 100 idle: 2/3 of 2 cores busy
    assert busy_cores(before, after) == pytest.approx(2 * 200 / 300)
    assert busy_cores(before, before) == 0.0


def test_passive_openmp_waits_only_before_torch_and_never_over_the_users_choice(monkeypatch):
    import os
    import sys

    from tbps.engine.runtime import passive_openmp_waits

    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.setitem(sys.modules, "torch", object())  # torch loaded: too late to matter
    assert not passive_openmp_waits() and "OMP_WAIT_POLICY" not in os.environ
    monkeypatch.delitem(sys.modules, "torch")
    assert passive_openmp_waits() and os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    assert not passive_openmp_waits() and os.environ["OMP_WAIT_POLICY"] == "ACTIVE"


def test_train_says_how_much_training_a_budget_bought():
    from tbps.cli.train import steps_line

    s = {"global_step": 210, "total_steps": 2610, "epochs_trained": 2.414, "elapsed_s": 481.0,
         "stopped_by_budget": True}
    assert steps_line(s, 8.0, "wall") == ("trained 210 of 2610 steps (2.414 epochs) in 8 min 1 s: the wall time "
                                          "budget of 8 min ended it")
    done = {**s, "global_step": 2610, "epochs_trained": 30.0, "stopped_by_budget": False}
    assert steps_line(done, 60.0, "cpu").endswith("(30 epochs) in 8 min 1 s, within the cpu time budget of 60 min")
    assert steps_line(done, None, "wall") == "trained 2610 of 2610 steps (30 epochs) in 8 min 1 s"
