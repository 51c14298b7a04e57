"""hangkit.jupyter's cluster with real MPI engines (ipyparallel on mpiexec), one cluster shared
by the tests of this module: engine ids are ranks, every engine reports to the kernel's
monitor, calls return at once while ranks work or hang (IP-01), interrupts escalate (WJ-07,
IP-02), engines restart, and engines that never register fail within a deadline (IP-03)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import psutil
import pytest

from hangkit.flight_recorder.environment import recorder_environment
from hangkit.jupyter.cluster import ClusterStartError, EngineCluster
from hangkit.jupyter.example import build_runner, hang_raise_then_barrier
from hangkit.launcher import free_port

pytestmark = pytest.mark.timeout(180)


def until(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not (found := condition()):
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        time.sleep(0.05)  # ok-sleep: polls the condition against the deadline
    return found


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with pytest.MonkeyPatch.context() as env:  # restored for the modules after this one
        env.setenv("IPYTHONDIR", str(tmp_path_factory.mktemp("ipython")))
        env.setenv("HANGKIT_NONINTERACTIVE", "1")  # the dashboard prints text here
        c = EngineCluster(4, start_timeout=60).start()
        pids = [i["pid"] for i in c.engines.values()]
        yield c
        c.close()
    gone, alive = psutil.wait_procs([psutil.Process(p) for p in pids if psutil.pid_exists(p)],
                                    timeout=10)
    assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE], "engines left behind"


def test_engine_ids_are_mpi_ranks_and_every_engine_reports(cluster):
    assert cluster.ranks == [0, 1, 2, 3]
    assert [cluster.engines[r]["rank"] for r in cluster.ranks] == [0, 1, 2, 3]
    statuses = cluster.monitor.statuses()
    assert [s.rank for s in statuses] == [0, 1, 2, 3]
    assert {s.status for s in statuses} == {"idle"}  # between cells: never "stalled"


def test_engines_run_with_torchs_flight_recorder_on(cluster):
    expected = recorder_environment(dict(os.environ))[0]["TORCH_FR_BUFFER_SIZE"]
    task = cluster.apply(os.getenv, "TORCH_FR_BUFFER_SIZE")
    assert task.wait(60), task.states()
    assert task.values() == {r: expected for r in range(4)}


def test_training_steps_return_at_once_and_the_dashboard_follows(cluster):
    live = cluster.dashboard(total_steps=8, interval=0.5)
    setup = cluster.setup(build_runner, free_port(), epochs=2, timeout=20)
    assert setup.done() and setup.errors() == {}, setup.errors()
    started = time.monotonic()
    task = cluster.steps(3)
    assert time.monotonic() - started < 1.0  # a handle, not a wait
    assert task.wait(60), task
    assert {r: v["step"] for r, v in task.values().items()} == {0: 3, 1: 3, 2: 3, 3: 3}
    # The agents' beats follow within a beat interval (1 s): the last step reported is index 2.
    until(lambda: [(s.status, s.step) for s in cluster.monitor.statuses()] == [("idle", 2)] * 4,
          5, "every rank idle after step 2")
    live.tick()
    assert len(live.dashboard.rows) == 4
    assert "rank 3: idle, step 2/8" in live.text()
    task = cluster.steps(None)  # to the end: 2 epochs of 4 steps
    assert task.wait(60), task
    assert all(v["finished"] and v["step"] == 8 for v in task.values().values())
    histories = cluster.histories()
    assert sorted(histories) == [0, 1, 2, 3] and all(len(h) == 8 for h in histories.values())
    assert set(histories[0][0]["phases"]) >= {"data", "sync", "forward", "backward"}


def test_doctor_runs_from_the_engines_and_gives_probe_results(cluster):
    from hangkit.jupyter.cluster import doctor_results

    task = cluster.doctor(only="environment,af_unix", timeout=20)
    assert task.wait(60), task
    results = doctor_results(task)
    assert sorted((r.name, r.rank) for r in results) == sorted(
        (n, r) for n in ("environment", "af_unix") for r in range(4))
    assert all(r.status in ("ok", "warn") for r in results), [r.to_json() for r in results]


def test_ip01_a_rank_raises_while_the_others_wait_and_the_call_returns(cluster):
    left = set(Path("/dev/shm").glob("mpich_shm_*")) | set(Path("/tmp").glob("hk-*.relay"))
    live = cluster.dashboard(interval=0.5)
    started = time.monotonic()
    task = cluster.apply(hang_raise_then_barrier, 2)
    assert time.monotonic() - started < 1.0
    errors = until(task.errors, 30, "rank 2's error")
    assert list(errors) == [2] and "ValueError: rank 2: a bad sample (on purpose)" in errors[2]
    assert task.states() == {0: "running", 1: "running", 2: "raised", 3: "running"}
    live.tick()
    assert "ValueError: rank 2: a bad sample" in live.text()
    # WJ-07/IP-02: SIGINT cannot reach a rank inside MPI_Barrier; the escalation gets there,
    # keeping the stacks first.
    report = cluster.interrupt(grace=2)
    text = "\n".join(report)
    assert report[0].startswith("SIGINT to ranks 0,1,3: ")
    assert "stacks of ranks 0,1,3: ranks 0,1,3 at hang_raise_then_barrier" in text
    assert "rank 2 never reached it" in text  # the diagnosis
    assert any(line.startswith(("SIGTERM", "SIGKILL")) and "stopped" in line
               for line in report), text
    assert "Barrier" in live.text() or "hang_raise_then_barrier" in live.text()
    # New engines, watched again. (The last test of the shared cluster: it closes it, so that
    # the engines it started are not left to the module's end.)
    cluster.restart()
    assert [s.status for s in cluster.monitor.statuses()] == ["idle"] * 4
    assert cluster.apply(os.getpid).wait(30)
    cluster.close()
    # The killed engines could not remove their MPI shared memory: the cluster did. Their
    # relay removed its socket.
    assert not (set(Path("/dev/shm").glob("mpich_shm_*"))
                | set(Path("/tmp").glob("hk-*.relay"))) - left


def test_ip03_engines_that_never_register_fail_within_the_deadline(tmp_path, monkeypatch):
    site = tmp_path / "site"
    site.mkdir()
    # Imported by every Python started with this path: the engines (under mpiexec) block,
    # as engines do on a node whose filesystem hangs; the controller starts normally.
    (site / "sitecustomize.py").write_text(
        "import os, sys, threading\n"
        "if os.environ.get('PMI_RANK') is not None:\n"
        "    print('engine stuck on purpose', flush=True)\n"
        "    threading.Event().wait()\n")
    monkeypatch.setenv("PYTHONPATH", str(site))
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
    started = time.monotonic()
    with pytest.raises(ClusterStartError) as caught:
        EngineCluster(2, start_timeout=10).start()
    seconds = time.monotonic() - started
    message = str(caught.value)
    assert message.startswith("2 MPI engines did not start and register within 10 s"), message
    assert "engine stuck on purpose" in message
    assert seconds < 10 + 15, seconds


@pytest.mark.parametrize("kwargs, words", [({"n": 0}, "n must be at least 1 engine, got 0"),
                                           ({"start_timeout": -1},
                                            "start_timeout must be a positive number")])
def test_bad_settings_are_named(kwargs, words):
    with pytest.raises(Exception) as caught:
        EngineCluster(**kwargs)
    assert words in str(caught.value)


def test_inside_a_pbs_job_engines_take_the_job_flags_and_listen_where_nodes_reach(
        tmp_path, monkeypatch):
    # PBS and PALS cannot run here: a PBS_NODEFILE naming this host stands in for the job, and
    # MPICH's hydra takes the same --hostfile/--ppn flags PALS does.
    nodefile = tmp_path / "nodes"
    nodefile.write_text("localhost\n")
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
    environ = {**os.environ, "PBS_NODEFILE": str(nodefile), "PBS_JOBID": "123.fake-pbs"}
    with EngineCluster(2, bind="0.0.0.0", environ=environ) as cluster:
        assert cluster._ipp.config.MPILauncher.mpi_args == ["--hostfile", str(nodefile),
                                                             "--ppn", "2"]
        # The agents reached the monitor at the advertised host name, not at 127.0.0.1.
        assert not cluster.monitor.address.startswith("tcp://127.0.0.1:")
        assert [s.rank for s in cluster.monitor.statuses()] == [0, 1]
        assert cluster.apply(os.getpid).wait(30)
