"""`hangkit attach` on jobs hangkit did not start: plain mpiexec jobs (tests/programs/attach_job.py
imports nothing of hangkit's), a job on two simulated nodes found by its PBS_JOBID, and a job
under `hangkit watch` asked for a snapshot with SIGUSR1.

Each job signals readiness (a record per rank, written right before the rank blocks); attach's
own looks over --timeout see a rank or worker still on its way into its wait arrived.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import simnodes
from conftest import PROGRAMS, kill_tree, mpiexec

from hangkit.launcher import free_port

nodes = simnodes.nodes  # the fixture: two nodes sharing the test's tmp_path

HANGKIT = [sys.executable, "-m", "hangkit"]
JOB = str(PROGRAMS / "attach_job.py")
START_SECONDS = 240  # for every rank to be ready: torch imports on a loaded machine
WANDERING = 1


def start_job(tmp_path: Path, mode: str, ranks: int, *, extra: dict | None = None
              ) -> tuple[subprocess.Popen, Path]:
    ready = tmp_path / "ready"
    ready.mkdir(exist_ok=True)
    env = {**os.environ, "HANGKIT_READY_DIR": str(ready), "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1",
           "ATTACH_JOB_WANDERING": str(WANDERING), **(extra or {})}
    proc = subprocess.Popen([mpiexec(), "-n", str(ranks), sys.executable, JOB, mode], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    return proc, ready


def wait_ready(proc: subprocess.Popen, ready: Path, ranks: int) -> list[dict]:
    deadline = time.monotonic() + START_SECONDS
    while time.monotonic() < deadline:
        records = sorted(ready.glob("rank-*.json"))
        if len(records) == ranks:
            return [json.loads(p.read_text()) for p in records]
        if proc.poll() is not None:
            pytest.fail(f"the job exited {proc.returncode} before it was ready: "
                        f"{proc.stdout.read().decode(errors='replace')[-3000:]}")
        time.sleep(0.2)  # ok-sleep: polling the readiness records, against a deadline
    pytest.fail(f"only {len(list(ready.glob('rank-*.json')))} of {ranks} ranks ready")


def end(proc: subprocess.Popen) -> None:
    """The test's own cleanup: the job's whole tree."""
    kill_tree(proc)
    proc.stdout.close()


def attach(*args: str, cwd: Path, timeout: float = 300, env: dict | None = None
           ) -> subprocess.CompletedProcess:
    return subprocess.run([*HANGKIT, "attach", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=timeout, env=env)


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.timeout(600)
def test_attach_names_the_rank_that_wandered_off_leaves_the_job_then_ends_it(tmp_path):
    proc, ready = start_job(tmp_path, "hang", 3)
    try:
        records = wait_ready(proc, ready, 3)
        done = attach(str(proc.pid), "--timeout", "8", "--report-dir", str(tmp_path / "r1"),
                      cwd=tmp_path)
        assert done.returncode == 124, done.stderr[-4000:]
        report = json.loads((tmp_path / "r1" / "hang-report.json").read_text())
        (td01,) = [d for d in report["diagnosis"] if d["kind"] == "TD-01"]
        assert f"rank {WANDERING} never reached it" in td01["summary"], td01
        assert "wander_off" in td01["summary"], td01
        ranks = {p["rank"] for p in report["processes"] if p["role"] == "rank"}
        assert ranks == {0, 1, 2}, report["processes"]
        workers = [p for p in report["processes"] if p["role"] == "dataloader-worker"]
        assert len(workers) == 6, [p["pid"] for p in workers]
        assert report["hang"] is True and report["detector"] == "attach"
        # Left running: every rank and worker is still there.
        pids = [r["pid"] for r in records] + [w for r in records for w in r["workers"]]
        assert all(alive(pid) for pid in pids), [pid for pid in pids if not alive(pid)]

        # Attached to a rank this time, and --end: the whole job goes, nothing left.
        rank = next(r["pid"] for r in records if r["rank"] == 2)
        done = attach(str(rank), "--timeout", "8", "--end", "--grace", "5",
                      "--report-dir", str(tmp_path / "r2"), cwd=tmp_path)
        assert done.returncode == 124, done.stderr[-4000:]
        assert "--end: ended" in done.stderr, done.stderr[-2000:]
        assert proc.wait(timeout=60) is not None
        gone_by = time.monotonic() + 60
        while any(alive(pid) for pid in pids) and time.monotonic() < gone_by:
            time.sleep(0.1)  # ok-sleep: the ended processes being reaped, against a deadline
        assert not [pid for pid in pids if alive(pid)]
    finally:
        end(proc)


@pytest.mark.timeout(600)
def test_attach_to_a_busy_healthy_job_says_progressing_and_the_job_finishes(tmp_path):
    proc, ready = start_job(tmp_path, "healthy", 2, extra={"ATTACH_JOB_STEPS": "4000"})
    try:
        wait_ready(proc, ready, 2)
        done = attach(str(proc.pid), "--end", "--report-dir", str(tmp_path / "r"),
                      cwd=tmp_path)
        assert done.returncode == 0, done.stderr[-4000:]
        assert "progressing" in done.stderr, done.stderr[-3000:]
        assert "left running" in done.stderr, done.stderr[-3000:]  # --end spares it
        report = json.loads((tmp_path / "r" / "hang-report.json").read_text())
        assert report["hang"] is False
        assert proc.wait(timeout=400) == 0, proc.stdout.read().decode(errors="replace")[-3000:]
    finally:
        end(proc)


def _user_namespaces() -> str | None:
    """Why an attach without ptrace permission cannot be staged here, or None."""
    if shutil.which("unshare") is None:
        return "unshare is missing"
    done = subprocess.run(["unshare", "--user", "--map-root-user", "true"],
                          capture_output=True, timeout=60)
    return None if done.returncode == 0 else "user namespaces are not allowed here"


@pytest.mark.timeout(600)
def test_attach_without_ptrace_permission_says_so_per_process_and_gives_no_verdict(tmp_path):
    """In a user namespace of its own, attach has no ptrace right over the job (as over another
    user's job, or under ptrace_scope): the kernel refuses py-spy and /proc/PID/environ."""
    why = _user_namespaces()
    if why:
        pytest.skip(why)
    proc, ready = start_job(tmp_path, "hang", 2)
    try:
        records = wait_ready(proc, ready, 2)
        done = subprocess.run(["unshare", "--user", "--map-root-user", *HANGKIT, "attach",
                               str(proc.pid), "--report-dir", str(tmp_path / "r")],
                              capture_output=True, text=True, cwd=tmp_path, timeout=300)
        assert done.returncode == 1, done.stderr[-3000:]
        assert "no verdict" in done.stderr, done.stderr[-3000:]
        report = json.loads((tmp_path / "r" / "hang-report.json").read_text())
        ranks = {r["pid"]: r for r in records}
        seen = [p for p in report["processes"] if p["pid"] in ranks]
        assert len(seen) == 2, report["processes"]
        for p in seen:
            assert "ptrace denied" in (p["stack_error"] or ""), p
            assert p["role"] == "rank" and p["state"] in ("blocked", "busy"), p
            assert p["cpu_percent"] is not None, p
        assert all(alive(pid) for pid in ranks)
    finally:
        end(proc)


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("args", "code", "says"), [
    ([], 2, "give a PID or --job"),
    (["abc"], 2, "not a process id: 'abc'"),
    (["--job", "1", "--end", "--hosts", "/nonexistent"], 2, "--hosts: cannot read"),
    (["4194304"], 1, "no process 4194304"),
    (["--job", "nosuchjob.pbs"], 1, "no process of PBS job nosuchjob.pbs"),
])
def test_attach_bad_input_and_no_such_job_get_one_line(tmp_path, args, code, says):
    done = attach(*args, cwd=tmp_path, timeout=60)
    assert done.returncode == code, done.stderr
    assert says in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


@pytest.mark.timeout(600)
def test_usr1_to_a_watched_hung_job_writes_a_snapshot_and_the_hang_is_still_caught(tmp_path):
    ready = tmp_path / "ready"
    ready.mkdir()
    reports = tmp_path / "reports"
    env = {**os.environ, "HANGKIT_READY_DIR": str(ready), "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port()), "ATTACH_JOB_WANDERING": str(WANDERING)}
    # The timeout leaves the snapshot (a look and a capture, slower under load) its time.
    # attach_job.py prints nothing: its silence counts from the start (--startup-timeout).
    watch = subprocess.Popen([*HANGKIT, "watch", "--timeout", "30", "--startup-timeout", "45",
                              "--grace", "5",
                              "--report-dir", str(reports), "--", mpiexec(), "-n", "2",
                              sys.executable, JOB, "hang"], env=env, cwd=tmp_path,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        records = wait_ready(watch, ready, 2)
        watch.send_signal(signal.SIGUSR1)
        snapshot = reports / "snapshot-1" / "hang-report.json"
        deadline = time.monotonic() + 120
        while not snapshot.exists() and time.monotonic() < deadline:
            assert watch.poll() is None, watch.stderr.read().decode(errors="replace")[-3000:]
            time.sleep(0.2)  # ok-sleep: watch writes it whole (renamed into place); a deadline
        taken = json.loads(snapshot.read_text())
        assert taken["detector"] == "snapshot" and taken["hang"] is False, taken["reason"]
        assert {p["rank"] for p in taken["processes"] if p["role"] == "rank"} == {0, 1}
        assert all(alive(r["pid"]) for r in records)  # the job goes on
        # attach WATCH_PID asks the same way, and reads what watch wrote.
        done = attach(str(watch.pid), cwd=tmp_path)
        assert done.returncode == 0, done.stderr[-3000:]
        assert "snapshot-2" in done.stderr, done.stderr[-3000:]
        assert watch.wait(timeout=300) == 124
        err = watch.stderr.read().decode(errors="replace")
        assert "snapshot: " in err, err[-3000:]
        final = json.loads((reports / "hang-report.json").read_text())
        assert final["hang"] is True and final["detector"] == "output", final["reason"]
    finally:
        if watch.poll() is None:
            watch.kill()
            watch.wait(timeout=60)
        watch.stderr.close()


@pytest.mark.timeout(600)
def test_attach_by_pbs_job_id_on_two_simulated_nodes(nodes, tmp_path):
    """A job no hangkit started, 2 ranks a node, with the PBS_JOBID a PBS job's processes
    carry (PBS itself cannot run here: the variable is set as PBS would set it). attach runs
    on node 0 and reaches node 1 as a user does (ssh: here simssh, $HANGKIT_SSH)."""
    ready = tmp_path / "ready"
    ready.mkdir()
    job_id = f"{os.getpid()}.sim-pbs"
    hosts = tmp_path / "hosts"
    hosts.write_text("hknode0\nhknode1\nhknode9\n")  # hknode9: a node that cannot be reached
    env = nodes.env(MASTER_ADDR=nodes.hosts[0], MASTER_PORT=str(free_port()),
                    HANGKIT_READY_DIR=str(ready), PBS_JOBID=job_id, OMP_NUM_THREADS="1",
                    ATTACH_JOB_WANDERING="3")
    job = nodes.popen(0, [str(Path(sys.executable).with_name("mpiexec")), "-n", "4",
                          "-ppn", "2", "--hostfile", str(nodes.nodefile), sys.executable, JOB,
                          "hang"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_ready(job, ready, 4)
        attach_env = nodes.env(HANGKIT_SSH=str(simnodes.SIMSSH))
        done = nodes.run(0, [*HANGKIT, "attach", "--job", job_id, "--hosts", str(hosts),
                             "--timeout", "8", "--report-dir", str(tmp_path / "r")],
                         env=attach_env, timeout=400)
        assert done.returncode == 124, done.stderr[-4000:]
        report = json.loads((tmp_path / "r" / "hang-report.json").read_text())
        placed = {(p["rank"], p["host"]) for p in report["processes"] if p["role"] == "rank"}
        assert placed == {(0, "hknode0"), (1, "hknode0"), (2, "hknode1"), (3, "hknode1")}
        workers = [p["host"] for p in report["processes"] if p["role"] == "dataloader-worker"]
        assert sorted(workers) == ["hknode0"] * 4 + ["hknode1"] * 4, workers
        by_host = {n["host"]: n for n in report["nodes"]}
        assert by_host["hknode0"]["answered"] and by_host["hknode1"]["answered"], by_host
        assert not by_host["hknode9"]["answered"], by_host
        (td01,) = [d for d in report["diagnosis"] if d["kind"] == "TD-01"]
        assert "rank 3 never reached it" in td01["summary"], td01
    finally:
        job.kill()  # the client: its node daemon ends the job's session
        job.communicate(timeout=60)
        simnodes.wait_for("the job gone from both nodes", nodes.leftovers,
                          lambda left: not left, timeout=120)
