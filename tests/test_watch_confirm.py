"""Verdicts that can be trusted: watch looks at every process before it calls a hang. A job
that is silent but progressing is left alone; one that waits, spins or loops is caught. Real
programs under `hangkit watch`; the classification itself is a pure function, tested beside."""

from __future__ import annotations

import pytest
from conftest import program

from hangkit.monitor.confirm import classify, credit_helpers
from hangkit.monitor.diagnose import from_looks
from hangkit.records import (
    Activity,
    Look,
    ProcessLook,
    ProcessSnapshot,
    ProcessState,
    Role,
    ThreadStack,
)

HANG = 124
A, B, C, D, E = ((("f", f"/home/u/{x}.py", 1),) for x in "abcde")


@pytest.mark.parametrize("history, look, busy, inside, expected", [
    ([], [A, A, A], False, False, Activity.WAITING),
    ([], [A, A, A], True, False, Activity.SPINNING),
    ([], [A, A, A], True, True, Activity.WAITING),  # MPI busy-polls inside a collective
    ([B], [A, A], False, False, Activity.WAITING),  # it moved since, and now stands still
    ([A, B], [A, A, A], False, False, Activity.LOOPING),  # back where it was, again
    ([A, A], [A, A], True, False, Activity.SPINNING),  # it never moved
    ([], [A, B, C, D], True, False, Activity.PROGRESSING),
    ([], [A, A, B, B, C], False, False, Activity.PROGRESSING),
    ([], [A, B, A, B], False, False, Activity.LOOPING),
    ([A, B], [A, B, A], True, False, Activity.LOOPING),  # a loop slower than one look
    ([A, B, C], [D, E], True, False, Activity.PROGRESSING),
    ([A, B, C], [A, D, E], True, False, Activity.PROGRESSING),  # mostly new
    ([A, B, C], [A, D, E, B], True, False, Activity.LOOPING),  # as much old as new
    ([], [], False, False, Activity.GONE),
])
def test_classify(history, look, busy, inside, expected):
    assert classify(history, look, busy=busy, in_collective=inside) == expected


def helper_tree(g_state: ProcessState, helper: Activity, grown: float) -> str:
    """A rank (10) waiting, with a Python helper (11), a program (12: g++) and a DataLoader
    worker (13, spinning); what the rank is judged, and why."""
    snap = [ProcessSnapshot(10, 1, 0, Role.RANK, ["python", "train.py"], ProcessState.BLOCKED),
            ProcessSnapshot(11, 10, 0, Role.OTHER, ["python", "worker.py"], ProcessState.BUSY,
                            threads=[ThreadStack(1, "MainThread")]),
            ProcessSnapshot(12, 11, 0, Role.OTHER, ["g++", "-c"], g_state, cpu_percent=97.0),
            ProcessSnapshot(13, 10, 0, Role.DATALOADER_WORKER, ["python"], ProcessState.BUSY)]
    looked = {("n", 10): ProcessLook(10, 0, Role.RANK, Activity.WAITING, "wait (train.py:3)"),
              ("n", 11): ProcessLook(11, 0, Role.OTHER, helper, "importing (sympy/x.py)"),
              ("n", 13): ProcessLook(13, 0, Role.DATALOADER_WORKER, Activity.SPINNING, "f")}
    for s in snap:
        s.host = "n"
    credit_helpers(looked, snap, "n", {11: (grown, 0.0), 13: (5.0, 0.0)}, 2.0)
    rank = looked[("n", 10)]
    return f"{rank.activity}: {rank.where}"


def test_a_rank_whose_helpers_work_is_progressing_and_its_workers_do_not_count():
    assert helper_tree(ProcessState.BLOCKED, Activity.PROGRESSING, 0.0) == (
        "progressing: wait (train.py:3), while its subprocess 11 is progressing: importing "
        "(sympy/x.py)")
    assert helper_tree(ProcessState.BUSY, Activity.WAITING, 0.0) == (
        "progressing: wait (train.py:3), while its subprocess 12 (g++) is busy (97% CPU)")
    assert helper_tree(ProcessState.BLOCKED, Activity.WAITING, 1.5) == (
        "progressing: wait (train.py:3), while its subprocesses (python) used 1.5 s of CPU "
        "in 2.0 s")
    # A spinning DataLoader worker's CPU is its own verdict, never the rank's progress.
    assert helper_tree(ProcessState.BLOCKED, Activity.WAITING, 0.1) == "waiting: wait (train.py:3)"


def test_a_rank_whose_children_came_and_went_during_the_look_is_progressing():
    """g++ runs for a second or two: gone before the capture, its CPU is in the rank's."""
    rank = ProcessSnapshot(10, 1, 0, Role.RANK, ["python", "train.py"], ProcessState.BLOCKED,
                           host="n")
    looked = {("n", 10): ProcessLook(10, 0, Role.RANK, Activity.WAITING, "result (f.py:1)")}
    credit_helpers(looked, [rank], "n", {10: (0.01, 1.2)}, 2.0)
    assert looked[("n", 10)].activity == Activity.PROGRESSING
    assert looked[("n", 10)].where.endswith(
        "its subprocesses (exited children) used 1.2 s of CPU in 2.0 s")
    credit_helpers(looked := {("n", 10): ProcessLook(10, 0, Role.RANK, Activity.WAITING, "r")},
                   [rank], "n", {10: (1.9, 0.0)}, 2.0)  # its own CPU is its own activity
    assert looked[("n", 10)].activity == Activity.WAITING


def test_a_loop_is_named_by_every_place_it_returns_to_over_the_looks():
    def look(activity, stacks):
        return Look(at=1.0, seconds=1.0, samples=len(stacks), processes=[ProcessLook(
            pid=7, rank=0, role=Role.RANK, activity=activity, where="x", stacks=stacks,
            distinct=len(set(stacks)))])

    # The last look's samples all caught it backing off; it tried to connect in between.
    looks = [look(Activity.PROGRESSING, ["start_up", "try_to_connect", "back_off",
                                         "try_to_connect"]),
             look(Activity.LOOPING, ["back_off", "back_off", "back_off"])]
    (loop,) = from_looks(looks)
    assert "between try_to_connect, back_off:" in loop.summary, loop.summary
    assert "start_up" not in loop.summary  # passed through once, not part of the loop
    assert loop.ranks == [0] and loop.pids == [7]


def test_a_silent_job_that_keeps_progressing_is_left_to_finish(run_watch):
    # Silent for three timeouts while its stack moves from import to import, then done.
    run = run_watch(program("busy_silent.py") + ["6"], options=["--timeout", "2", "--grace", "1"],
                    timeout=240)
    assert run.returncode == 0, run.err
    assert "imported" in run.stdout.decode()
    assert "progressing: " in run.err and "importing (" in run.err, run.err
    assert not run.report_dir.exists()


def test_a_ceiling_ends_even_a_progressing_job_and_says_so(run_watch):
    run = run_watch(program("busy_silent.py") + ["600"],
                    options=["--timeout", "1", "--max-silence", "4", "--grace", "1"],
                    timeout=240)
    assert run.returncode == HANG, run.err
    report = run.report
    assert "--max-silence 4" in report["reason"] and "progressing" in report["reason"]
    assert report["looks"][-1]["verdict"] == "ceiling"
    assert report["idle_seconds"] >= 4


def test_a_retry_loop_is_caught_and_called_looping(run_watch):
    run = run_watch(program("retry_loop.py"), options=["--timeout", "1", "--grace", "1"],
                    timeout=240)
    assert run.returncode == HANG, run.err
    report = run.report
    (ready,) = run.ready_records()
    looping = [d for d in report["diagnosis"] if d["kind"] == "looping"]
    assert len(looping) == 1, (report["diagnosis"], report["looks"])
    (loop,) = looping
    assert loop["pids"] == [ready["pid"]]
    assert "try_to_connect" in loop["summary"] and "back_off" in loop["summary"], loop
    (last,) = [p for p in report["looks"][-1]["processes"] if p["pid"] == ready["pid"]]
    # One look's samples may all catch it in one place; over the looks it showed both.
    assert last["activity"] == "looping"
    assert {s.split(" (")[0] for look in report["looks"] for p in look["processes"]
            if p["pid"] == ready["pid"] for s in p["stacks"]} >= {"try_to_connect", "back_off"}
    assert "What hangkit saw before calling it:" in run.err


def test_a_rank_holding_the_gil_in_one_c_call_is_caught_spinning(run_watch):
    run = run_watch(program("gil_held.py"), options=["--timeout", "2", "--grace", "1"],
                    timeout=240)
    assert run.returncode == HANG, run.err
    (ready,) = run.ready_records()
    (last,) = [p for p in run.report["looks"][-1]["processes"] if p["pid"] == ready["pid"]]
    assert last["activity"] == "spinning", last
    assert "hold_the_gil" in last["where"]
