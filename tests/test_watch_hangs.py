"""`hangkit watch` on real hangs: capture, report, diagnosis, and ending every process."""

from __future__ import annotations

import stat
import sys
from pathlib import Path

import psutil
import pytest
from conftest import mpiexec, program

from hangkit.launcher import free_port

HANG = 124


def assert_all_gone(pids):
    alive = [p for p in pids if psutil.pid_exists(p)
             and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    assert not alive, f"still running: {alive}"


def kinds(report: dict) -> list[str]:
    return [d["kind"] for d in report["diagnosis"]]


def main_frames(process: dict) -> list[dict]:
    main = next(t for t in process["threads"] if t["is_main"])
    return main["frames"]


def test_gil_holding_loop_is_captured_and_called_busy(run_watch):
    run = run_watch(program("gil_loop.py"), options=["--timeout", "1", "--grace", "2"])
    assert run.returncode == HANG, run.err
    (ready,) = run.ready_records()
    proc = run.process(ready["pid"])
    assert proc["state"] == "busy"
    assert proc["role"] == "rank" and proc["rank"] is None
    frames = main_frames(proc)
    assert frames[-1]["function"] == "spin_forever"
    assert frames[-1]["file"].endswith("gil_loop.py")
    assert [f["function"] for f in frames].index("<module>") < len(frames) - 1, "outermost first"
    assert "IP-04" in kinds(run.report)
    assert "HANG: no output for" in run.err and "[IP-04]" in run.err
    assert_all_gone([ready["pid"]])


def test_processes_ignoring_sigterm_or_leaving_the_session_are_killed(run_watch):
    run = run_watch(program("ignores_sigterm.py"), options=["--timeout", "1", "--grace", "1"])
    assert run.returncode == HANG, run.err
    records = {r["kind"]: r for r in run.ready_records()}
    assert set(records) == {"main", "grandchild", "daemon"}
    pids = [records["main"]["pid"], records["grandchild"]["grandchild"],
            records["daemon"]["pid"]]
    captured = {p["pid"]: p for p in run.report["processes"]}
    assert set(pids) <= set(captured), "the daemon in its own session is part of the job"
    assert captured[records["daemon"]["pid"]]["session_id"] != captured[pids[0]]["session_id"]
    assert "with SIGKILL" in run.err
    assert_all_gone(pids)


def left_by_mpi() -> set[Path]:
    """MPICH's shared memory and hydra's topology files: a killed rank or proxy leaves them."""
    return set(Path("/dev/shm").glob("mpich_shm_*")) | set(Path("/tmp").glob("hydra_hwloc_*"))


def test_mpi_ranks_ignoring_sigterm_are_killed_before_their_launchers_and_leave_nothing(
        run_watch):
    before = left_by_mpi()
    run = run_watch([mpiexec(), "-n", "2", *program("mpi_ignores_sigterm.py")],
                    options=["--timeout", "2", "--grace", "1"], timeout=120)
    assert run.returncode == HANG, run.err
    assert "with SIGKILL" in run.err and "removed the shared memory" in run.err, run.err
    assert not left_by_mpi() - before
    assert_all_gone([p["pid"] for p in run.report["processes"]])


def test_report_files_are_private_and_secrets_redacted(run_watch, tmp_path):
    # PBS itself cannot run here: its variables and node file are set by hand.
    nodefile = tmp_path / "nodefile"
    nodefile.write_text("x3004c0s1b0n0\nx3004c0s7b1n0\n")
    run = run_watch(program("gil_loop.py") + ["--api-key", "hunter2"],
                    options=["--timeout", "1", "--grace", "1"],
                    env={"WANDB_API_KEY": "hunter2", "NCCL_DEBUG": "INFO",
                         "PBS_JOBID": "1234.polaris-pbs-01", "PBS_NODEFILE": str(nodefile)})
    assert run.returncode == HANG
    assert stat.S_IMODE(run.report_dir.stat().st_mode) == 0o700
    for name in ("hang-report.json", "hang-report.md"):
        path = run.report_dir / name
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert "hunter2" not in path.read_text()
    context = run.report["context"]
    assert context["environment"]["WANDB_API_KEY"] == "<redacted>"
    assert context["environment"]["NCCL_DEBUG"] == "INFO"
    assert (context["pbs_jobid"], context["nodes"]) == ("1234.polaris-pbs-01", 2)
    assert context["ranks_on_this_node"] == 1
    assert "--api-key <redacted>" in (run.report_dir / "hang-report.md").read_text()


def test_default_report_dir_is_new_and_printed(tmp_path):
    import subprocess

    done = subprocess.run([sys.executable, "-m", "hangkit", "watch", "--timeout", "1",
                           "--grace", "1", "--", *program("gil_loop.py")],
                          capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert done.returncode == HANG
    (made,) = tmp_path.glob("hangkit-report-*")
    assert str(made.name) in done.stderr.splitlines()[-1]
    assert (made / "hang-report.md").read_text().startswith("# hangkit hang report")


def test_dl01_worker_stuck_in_getitem(run_watch):
    run = run_watch(program("dl01_stuck_worker.py"), options=["--timeout", "2", "--grace", "2"])
    assert run.returncode == HANG, run.err
    records = {r["kind"]: r for r in run.ready_records()}
    main_pid, worker_pid = records["main"]["pid"], records["worker"]["pid"]
    roles = {p["pid"]: p["role"] for p in run.report["processes"]}
    assert roles[main_pid] == "rank"
    assert roles[worker_pid] == "dataloader-worker"
    assert sum(r == "dataloader-worker" for r in roles.values()) == 2
    (dl01,) = [d for d in run.report["diagnosis"] if d["kind"] == "DL-01"]
    assert worker_pid in dl01["pids"] and main_pid in dl01["pids"]
    assert f"worker pid {worker_pid} is in FileDataset.__getitem__ at" in dl01["summary"]
    assert "fetching index [5]" in dl01["summary"]
    assert run.process(worker_pid)["fetching"] == "[5]"
    assert "stalled-share.fifo" in dl01["summary"]
    assert_all_gone([main_pid, worker_pid])


def test_mpi_barrier_with_a_rank_elsewhere(run_watch):
    before = left_by_mpi()
    run = run_watch([mpiexec(), "-n", "4", *program("mp02_barrier_skip.py")],
                    options=["--timeout", "2", "--grace", "2"], timeout=90)
    assert run.returncode == HANG, run.err
    report = run.report
    ranks = {p["rank"]: p for p in report["processes"] if p["role"] == "rank"}
    assert sorted(ranks) == [0, 1, 2, 3]
    assert {p["role"] for p in report["processes"]} == {"launcher", "rank"}
    (split,) = [d for d in report["diagnosis"] if d["kind"] == "MP-02"]
    assert split["ranks"] == [2]
    assert "Ranks 0,1,3 wait in Barrier" in split["summary"]
    assert "rank 2" in split["summary"] and "evaluate_on_rank_2" in split["summary"]
    first, second = report["groups"]
    assert first["ranks"] == [0, 1, 3] and second["ranks"] == [2]
    assert "mp02_barrier_skip.py" in first["location"]
    assert "[rank 2] evaluate_on_rank_2" in run.err
    assert_all_gone([p["pid"] for p in report["processes"]])
    assert not left_by_mpi() - before  # the ranks' segment went with them


@pytest.mark.parametrize("inject", [True, False])
def test_gloo_all_reduce_with_a_rank_elsewhere(run_watch, inject):
    """With agents (injected), the recorder names the sequence number; without, the stacks
    alone name the collective and the odd rank."""
    run = run_watch([mpiexec(), "-n", "4", *program("td01_gloo_skip.py")],
                    options=["--timeout", "3", "--grace", "2",
                             *([] if inject else ["--no-inject"])], timeout=120,
                    env={"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())})
    assert run.returncode == HANG, run.err
    (td01,) = [d for d in run.report["diagnosis"] if d["kind"] == "TD-01"]
    assert td01["ranks"] == [2]
    assert td01["summary"].startswith("Ranks 0,1,3 wait in all_reduce #2 of the default group"
                                      if inject else "Ranks 0,1,3 wait in all_reduce at")
    assert "checkpoint_on_rank_2" in td01["summary"]
    tree = run.report["tree"]
    assert tree["ranks"] == [0, 1, 2, 3]
    assert_all_gone([p["pid"] for p in run.report["processes"]])


def test_dl04_lock_acquired_in_a_forked_child(run_watch):
    run = run_watch(program("dl04_lock_after_fork.py"), options=["--timeout", "1",
                                                                   "--grace", "1"])
    assert run.returncode == HANG, run.err
    (dl04,) = [d for d in run.report["diagnosis"] if d["kind"] == "DL-04"]
    assert "child_work" in dl04["summary"] and "forked from pid" in dl04["summary"]


def test_wj01_socket_wait_inside_an_init(run_watch):
    run = run_watch(program("wj01_init_socket.py"), options=["--timeout", "1", "--grace", "1"])
    assert run.returncode == HANG, run.err
    (wj01,) = [d for d in run.report["diagnosis"] if d["kind"] == "WJ-01"]
    assert "inside init at" in wj01["summary"] and "socket:" in wj01["summary"]


def test_td05_rendezvous_wait(run_watch):
    run = run_watch(program("td05_rendezvous.py"), options=["--timeout", "2", "--grace", "1"])
    assert run.returncode == HANG, run.err
    assert "TD-05" in kinds(run.report), run.report["diagnosis"]


def test_a_blocking_open_of_a_fifo_is_named_as_one_not_as_a_slow_filesystem(run_watch):
    # A hung shared filesystem cannot be made here; a FIFO blocks open() alike, and the kernel
    # tells the two apart. (The slow-filesystem rule itself: test_analysis.py.)
    run = run_watch(program("slow_open.py"), options=["--timeout", "1", "--grace", "1"])
    assert run.returncode == HANG, run.err
    assert "slow-filesystem" not in kinds(run.report)
    (fifo,) = [d for d in run.report["diagnosis"] if d["kind"] == "fifo-wait"]
    assert "blocked opening the named pipe (FIFO)" in fifo["summary"]
    assert "shard-0007.bin" in fifo["summary"] and "load_shard" in fifo["summary"]
    (ready,) = run.ready_records()
    assert run.process(ready["pid"])["syscall"]["target_kind"] == "fifo"


def test_missing_py_spy_is_reported_and_the_job_still_ended(run_watch):
    # No agent (--no-inject): py-spy is the only reader of this process.
    run = run_watch(program("gil_loop.py"), options=["--timeout", "1", "--grace", "1",
                                                     "--no-inject"],
                    env={"HANGKIT_PY_SPY": "/nonexistent/py-spy"})
    assert run.returncode == HANG, run.err
    (ready,) = run.ready_records()
    assert run.process(ready["pid"])["stack_error"].startswith("py-spy not found")
    assert_all_gone([ready["pid"]])


def test_ptrace_denied_is_reported_and_capture_carries_on(run_watch, tmp_path):
    # A real denial: py-spy run as an unprivileged user cannot attach to our processes.
    if not Path("/usr/bin/setpriv").exists() or psutil.Process().uids().effective != 0:
        pytest.skip("needs root and setpriv to run py-spy as another user")
    py_spy = Path(sys.executable).with_name("py-spy")
    wrapper = tmp_path / "py-spy-as-nobody"
    wrapper.write_text(f"#!/bin/sh\nexec setpriv --reuid=65534 --regid=65534 --clear-groups "
                       f"{py_spy} \"$@\"\n")
    wrapper.chmod(0o755)
    run = run_watch(program("gil_loop.py"), options=["--timeout", "1", "--grace", "1",
                                                     "--no-inject"],
                    env={"HANGKIT_PY_SPY": str(wrapper)})
    assert run.returncode == HANG, run.err
    (ready,) = run.ready_records()
    proc = run.process(ready["pid"])
    assert proc["threads"] == []
    assert "ptrace denied" in proc["stack_error"]
    assert proc["state"] == "busy", "CPU sampling does not need ptrace"
    assert "ptrace denied" in (run.report_dir / "hang-report.md").read_text()
