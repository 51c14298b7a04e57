"""The step runner: phases reported, N steps at a time, failed epochs survived, cleanup on
success, failure and interrupt. Plain in-process training loops: nothing here can hang."""

from __future__ import annotations

import logging

import pytest

from hangkit.agent import beacon
from hangkit.training.runner import StepRunner, TrainingFailed


class Job:
    """A training step that records the phases the monitor would see, and fails on demand."""

    def __init__(self, fail_on=()):
        self.fail_on = set(fail_on)  # (epoch, batch) pairs that raise
        self.seen = []
        self.epoch = 0
        self.cleaned = []

    def step(self, batch, phase):
        phases = [beacon.state.phase]  # "data": the runner reported it while fetching
        for name in ("forward", "backward", "sync", "optimizer"):
            phase(name)
            phases.append(beacon.state.phase)
        self.seen.append((self.epoch, batch, tuple(phases)))
        if (self.epoch, batch) in self.fail_on:
            raise ValueError(f"bad batch {batch}")
        return {"loss": 1.0 / (batch + 1)}

    def start(self, epoch):
        self.epoch = epoch

    def runner(self, **kwargs):
        kwargs.setdefault("cleanup", [lambda: self.cleaned.append("pg"),
                                      lambda: self.cleaned.append("tracker")])
        return StepRunner(self.step, range(4), on_epoch_start=self.start, **kwargs)


def test_steps_a_few_at_a_time_reporting_every_phase():
    job = Job()
    runner = job.runner(epochs=2)
    state = runner.run(steps=3)
    assert (state.step, state.epoch, state.finished) == (3, 0, False)
    assert job.cleaned == []  # a partial run leaves everything open for the next cell
    assert job.seen[0][2] == ("data", "forward", "backward", "sync", "optimizer")
    assert beacon.state.phase == "log" and beacon.state.step == 2
    state = runner.run()
    assert (state.step, state.finished) == (8, True)
    assert [(e, b) for e, b, _ in job.seen] == [(e, b) for e in (0, 1) for b in range(4)]
    assert state.last_metrics == {"loss": 0.25}
    assert job.cleaned == ["pg", "tracker"]


def test_a_failed_epoch_is_logged_and_the_next_one_runs(caplog):
    job = Job(fail_on={(0, 2)})
    with caplog.at_level(logging.ERROR, logger="hangkit.training.runner"):
        state = job.runner(epochs=3).run()
    assert state.finished and len(state.failed_epochs) == 1
    assert "ValueError: bad batch 2" in state.failed_epochs[0]
    assert "epoch 0 failed at its step 2 (1 in a row)" in caplog.text
    assert [(e, b) for e, b, _ in job.seen if e == 1] == [(1, b) for b in range(4)]
    assert state.consecutive_failures == 0


def test_stops_after_max_consecutive_failures_and_cleans_up():
    job = Job(fail_on={(e, 1) for e in range(10)})
    with pytest.raises(TrainingFailed) as caught:
        job.runner(epochs=10, max_failures=3).run()
    assert "3 epochs failed in a row (the last: ValueError: bad batch 1)" in str(caught.value)
    assert len(caught.value.failures) == 3
    assert job.cleaned == ["pg", "tracker"]


def test_interrupt_is_not_swallowed_but_cleanup_runs():
    job = Job()

    def interrupted(batch, phase):
        raise KeyboardInterrupt

    job.step = interrupted
    with pytest.raises(KeyboardInterrupt):
        job.runner().run()
    assert job.cleaned == ["pg", "tracker"]


def test_a_failing_cleanup_step_does_not_stop_the_others(caplog):
    job = Job()
    cleaned = []

    def broken():
        raise OSError("process group already gone")

    runner = job.runner(cleanup=[broken, lambda: cleaned.append("loader")])
    runner.run()
    assert cleaned == ["loader"] and "cleanup step 'broken' failed" in caplog.text


def test_a_progress_line_every_log_interval(caplog):
    now = [0.0]
    job = Job()

    def step(batch, phase):
        now[0] += 12.0  # each step takes 12 s of (fake) time
        return {"loss": 0.5}

    job.step = step
    with caplog.at_level(logging.INFO, logger="hangkit.training.runner"):
        job.runner(epochs=2, log_interval=30.0, clock=lambda: now[0]).run()
    lines = [r.getMessage() for r in caplog.records if "step" in r.getMessage()
             and "epoch" in r.getMessage() and "done" not in r.getMessage()]
    assert lines == ["epoch 0, step 3 (3 in this epoch): loss 0.5",
                     "epoch 1, step 6 (2 in this epoch): loss 0.5"], lines


@pytest.mark.parametrize("kwargs, words", [({"epochs": 0}, "epochs must be at least 1"),
                                           ({"max_failures": 0}, "max_failures must be")])
def test_bad_settings_are_named(kwargs, words):
    with pytest.raises(Exception, match=words):
        Job().runner(**kwargs)


def test_every_training_name_resolves_without_loading_torch_at_import():
    import subprocess
    import sys

    code = ("import sys, hangkit.training as t\n"
            "heavy = [m for m in ('torch', 'mpi4py', 'wandb') if m in sys.modules]\n"
            "missing = [n for n in t.__all__ if getattr(t, n, None) is None]\n"
            "print(heavy, missing)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert done.stdout.strip() == "[] []", done.stdout + done.stderr


class FlagRecorder:
    """Records what the runner tells an ErrorFlag (the real one, over gloo ranks, is exercised
    by tests/test_examples.py's injections)."""

    def __init__(self):
        self.calls = []

    def check(self, error, *, step=None):
        self.calls.append((step, None if error is None else str(error)))


class FailingLoader:
    """Yields 0, 1, 2, 3; fetching batch `bad` of epoch 0 raises, as a dead worker does."""

    def __init__(self, bad):
        self.bad, self.epochs = bad, 0

    def __iter__(self):
        epoch, self.epochs = self.epochs, self.epochs + 1
        for batch in range(4):
            if epoch == 0 and batch == self.bad:
                raise RuntimeError("worker died")
            yield batch


def test_the_error_flag_is_checked_after_the_data_phase_and_carries_its_failure():
    job, flag = Job(), FlagRecorder()
    runner = StepRunner(job.step, FailingLoader(bad=2), epochs=2, error_flag=flag,
                        on_epoch_start=job.start)
    state = runner.run()
    # Every fetched batch is checked before its step; the failed fetch is reported, not run.
    assert flag.calls == [(0, None), (1, None), (2, "worker died"),
                          (2, None), (3, None), (4, None), (5, None)]
    assert [(e, b) for e, b, _ in job.seen] == [(0, 0), (0, 1), (1, 0), (1, 1), (1, 2), (1, 3)]
    assert len(state.failed_epochs) == 1 and "RuntimeError: worker died" in state.failed_epochs[0]


def test_each_step_records_its_phase_timings():
    job = Job()
    state = job.runner(epochs=1).run()
    assert [t["step"] for t in state.history] == [0, 1, 2, 3]
    timing = state.history[-1]
    assert list(timing["phases"]) == ["data", "forward", "backward", "sync", "optimizer", "log"]
    assert all(v >= 0 for v in timing["phases"].values()) and timing["epoch"] == 0
    assert state.history[0]["start"] <= timing["start"]
