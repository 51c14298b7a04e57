"""Progress beats end to end: real ranks with agents, a real monitor, real MPI and gloo.

Hang programs here need no readiness file: the stall the monitor reports is the signal, and
the watcher's own --progress-timeout is the deadline.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import kill_tree, mpiexec, program, removing_left_shared_memory
from test_watch_hangs import HANG, assert_all_gone, kinds

from hangkit.launcher import free_port
from hangkit.monitor.agentstacks import gather
from hangkit.monitor.server import Monitor
from hangkit.monitor.stall import StallConfig


def progress_report(run, detector="progress"):
    assert run.returncode == HANG, run.err
    report = run.report
    assert report["detector"] == detector, report["reason"]
    return report


def rank(report: dict, number: int) -> dict:
    return next(r for r in report["ranks"] if r["rank"] == number)


def test_chatty_but_stuck_job_is_caught_by_progress_timeout(run_watch):
    # The logger thread prints every 0.1 s, so --timeout 60 never fires; progress stopped.
    run = run_watch(program("chatty_stuck.py"),
                    options=["--timeout", "60", "--progress-timeout", "2", "--grace", "1"])
    report = progress_report(run)
    assert "(--progress-timeout 2)" in report["reason"]
    assert "still alive" in run.stdout.decode()
    (status,) = report["ranks"]
    assert status["status"] == "stalled" and status["phase"] == "data" and status["step"] == 4
    assert status["since_progress"] >= 2
    (pid,) = [r["pid"] for r in run.ready_records()]
    process = run.process(pid)
    assert process["note"] == "stacks from its agent"
    main = next(t for t in process["threads"] if t["is_main"])
    assert main["frames"][0]["file"].endswith("chatty_stuck.py")
    assert "hangkit-sidecar" not in [t["name"] for t in process["threads"]]
    assert "[stall] no rank advanced for 2 s" in run.err
    assert_all_gone([pid])


@pytest.mark.parametrize("launcher, name, case, ops", [
    ("mpi", "mpi_desync.py", "MP-02", ("Barrier", "allreduce")),
    ("gloo", "gloo_desync.py", "TD-02", ("broadcast", "all_reduce")),
])
def test_desync_is_located_by_sequence_numbers(run_watch, launcher, name, case, ops):
    """Every rank waits inside a collective (the sidecars answer from inside MPI and gloo
    waits); only the sequence numbers say that rank 2 is out of step: hangkit.instrument()'s
    for MPI, torch's Flight Recorder's (which replaces the same finding) for gloo."""
    run = run_watch([mpiexec(), "-n", "4", *program(name)],
                    options=["--timeout", "60", "--progress-timeout", "4", "--grace", "2"],
                    env={"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())},
                    timeout=120)
    report = progress_report(run)
    odd, common = ops
    (desync,) = [d for d in report["diagnosis"] if d["kind"] == case]
    if launcher == "mpi":
        assert desync["summary"] == ("Ranks are in different collectives: "
                                     f"rank 2 is in {odd} #4; ranks 0,1,3 are in {common} #4")
    else:
        summary = desync["summary"]  # each side with where it issued its call
        assert summary.startswith(
            f"Ranks disagree on collective #4 of the default group: rank 2 {odd} Float[8] "
            f"(from `dist.{odd}(")
        assert f"; ranks 0,1,3 {common} Float[8] (from `dist.{common}(" in summary
    assert desync["ranks"] == [2]
    assert "all-in-collective" not in kinds(report) and "IP-04" not in kinds(report)
    for number in range(4):
        status = rank(report, number)
        assert status["status"] == "waiting", status
        assert status["collective"]["inside"] and status["collective"]["seq"] == 4
        assert status["collective"]["op"] == (odd if number == 2 else common)
    ranks = [p for p in report["processes"] if p["role"] == "rank"]
    assert len(ranks) == 4 and all(p["note"] == "stacks from its agent" for p in ranks)
    first, second = report["groups"]
    assert first["ranks"] == [0, 1, 3] and second["ranks"] == [2]
    assert_all_gone([p["pid"] for p in report["processes"]])


def test_rank_killed_with_sigkill_is_dead_while_the_others_wait(run_watch, tmp_path):
    tmp = Path(tempfile.mkdtemp(prefix="hk-"))  # short: the watcher keeps it as TMPDIR
    run = run_watch([*program("launch_ranks.py"), "3", *program("store_dead_rank.py")],
                    options=["--timeout", "60", "--progress-timeout", "3", "--grace", "1"],
                    env={"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
                         "TMPDIR": str(tmp)},
                    timeout=120)
    # The killed rank's faulthandler dump file is removed (its agent never could).
    left = sorted(p.name for p in tmp.glob("hangkit-stacks-*"))
    shutil.rmtree(tmp, ignore_errors=True)
    assert left == []
    report = progress_report(run)
    assert rank(report, 1)["status"] == "dead"
    assert [rank(report, r)["status"] for r in (0, 2)] == ["stalled", "stalled"]
    (dead,) = [d for d in report["diagnosis"] if d["kind"] == "dead-rank"]
    assert dead["ranks"] == [1] and "exited" in dead["summary"]
    (stall,) = [e for e in report["events"] if e["kind"] == "stall"]
    assert stall["ranks"] == [1] and "rank 1 is dead" in stall["summary"]
    assert_all_gone([p["pid"] for p in report["processes"]])


@contextlib.contextmanager
def ranks_reporting_to(monitor: Monitor, command: list[str], extra_env: dict | None = None):
    """Runs a job whose agents report to monitor; ends its whole session afterwards."""
    env = {**os.environ, **monitor.environment(), **(extra_env or {})}
    with removing_left_shared_memory():
        yield from _ranks(command, env)


def _ranks(command: list[str], env: dict):
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        yield proc
    finally:
        alive = kill_tree(proc, timeout=10)
        proc.stderr.close()
        assert not alive, f"could not end {alive}"


def wait_for_event(monitor: Monitor, kind: str, proc, *, deadline: float):
    seen = []
    while time.monotonic() < deadline:
        for event in monitor.step():
            if event.kind == kind:
                return event
            seen.append(event)
        assert proc.poll() is None, f"job ended early: {proc.stderr.read().decode()[-2000:]}"
        time.sleep(0.1)  # ok-sleep: the detector's tick, bounded by the deadline
    pytest.fail(f"no {kind} event in time; saw {seen}; ranks {monitor.statuses()}")


def test_straggler_is_named_in_lockstep_training():
    # Every rank takes the same steps per second (they meet in Barrier each step); rank 1's
    # work is 8x the others', so they spend their time waiting for it inside Barrier.
    with Monitor(config=StallConfig(stall_after=60)) as monitor, ranks_reporting_to(
            monitor, [mpiexec(), "-n", "3", *program("mpi_straggler.py")]) as proc:
        event = wait_for_event(monitor, "straggler", proc, deadline=time.monotonic() + 60)
        assert event.ranks == [1], event
        assert event.scores["rank 1"] >= 2.0
        assert all(event.scores[k] < 2.0 for k in ("rank 0", "rank 2")), event.scores
        rates = {r.rank: r.step_rate for r in monitor.statuses()}
        assert all(rate and rate > 0 for rate in rates.values()), rates


def test_gil_holding_rank_is_dumped_by_faulthandler(tmp_path):
    """The sidecar cannot run while the main thread keeps the GIL in one C call; the
    faulthandler signal still gets the stack, from C."""
    with Monitor() as monitor, ranks_reporting_to(
            monitor, program("gil_held.py"),
            {"HANGKIT_READY_DIR": str(tmp_path), "RANK": "0"}) as proc:
        deadline = time.monotonic() + 30
        found = {}
        while time.monotonic() < deadline:
            # The sidecar answers until the main thread enters the C call; then only
            # faulthandler can.
            found = gather(monitor, ["rank 0"], timeout=0.5)
            if "rank 0" in found and found["rank 0"].source == "faulthandler":
                break
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        stacks = found.get("rank 0")
        assert stacks is not None and stacks.source == "faulthandler", found
        main = next(t for t in stacks.threads if t.is_main)
        assert [f.function for f in main.frames[-2:]] == ["<module>", "hold_the_gil"]
        assert main.frames[-1].file.endswith("gil_held.py")


def test_progress_without_a_monitor_is_harmless():
    code = ("import hangkit\n"
            "for i in range(100_000): hangkit.progress(step=i, phase='x', loss=0.5)\n"
            "hangkit.instrument(torch=False)\n"
            "print(hangkit.agent.current_agent())\n")
    for env in ({}, {"HANGKIT_MONITOR": "not an address", "HANGKIT_MONITOR_KEY": "k"}):
        base = {k: v for k, v in os.environ.items() if not k.startswith("HANGKIT_MONITOR")}
        done = subprocess.run([sys.executable, "-c", code], env={**base, **env},
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0 and done.stdout.strip() == "None", done.stderr


@pytest.mark.parametrize("value", ["-1", "0", "nan", "soon"])
def test_bad_progress_timeout_is_one_line(value, capsys):
    from hangkit.cli import main

    assert main(["watch", "--progress-timeout", value, "--", "true"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("hangkit: error:") and "\n" not in err and "progress-timeout" in err


def test_importing_hangkit_loads_nothing_heavy():
    """A training script pays only for the stdlib when it imports hangkit for progress()."""
    code = ("import sys, hangkit\n"
            "print(sorted(m for m in ('zmq', 'psutil', 'torch', 'mpi4py') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert done.stdout.strip() == "[]", done.stdout + done.stderr


def test_published_state_reaches_the_monitor():
    code = ("import sys, hangkit.agent as a\n"
            "a.publish('dataloader_workers', [{'pid': 7, 'state': 'fetching', 'index': 3}])\n"
            "a.publish('odd', {1, 2})\n"  # not JSON: sent as its text, beats go on
            "a.progress(step=1)\n"
            "sys.stdin.read()\n")
    with Monitor() as monitor:
        env = {**os.environ, **monitor.environment(), "RANK": "0"}
        proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdin=subprocess.PIPE)
        try:
            deadline, extra = time.monotonic() + 30, {}
            while time.monotonic() < deadline and "odd" not in extra:
                extra = next((r.extra for r in monitor.statuses() if r.rank == 0), {})
                time.sleep(0.05)  # ok-sleep: polling the monitor against the deadline
            assert extra == {"dataloader_workers": [{"pid": 7, "state": "fetching", "index": 3}],
                             "odd": "{1, 2}"}, extra
        finally:
            proc.stdin.close()
            proc.wait(timeout=10)
