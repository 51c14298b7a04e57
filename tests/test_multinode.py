"""Hangs across two nodes, simulated as namespaces (tests/simnodes.py): 2 nodes x 2 ranks, real
hydra (mpiexec) launching each rank under `hangkit rank`, DDP on gloo, DataLoader workers.

hangkit watch runs on node 0, where node 1's processes do not exist for it: no /proc entry, no
py-spy, no signal. Everything it knows of node 1 comes through that node's relay. Each hang is
located (its rank, its node, its stacks and collectives), and ended with nothing left on
either node.
"""

from __future__ import annotations

import json
import selectors
import subprocess
import sys
import time
from pathlib import Path

import pytest
import simnodes
from conftest import PROGRAMS

from hangkit.launcher import free_port

nodes = simnodes.nodes  # the fixture: two nodes sharing the test's tmp_path

HANGKIT = str(Path(sys.executable).with_name("hangkit"))
MPIEXEC = str(Path(sys.executable).with_name("mpiexec"))
PROGRAM = str(PROGRAMS / "multinode_train.py")
# Short: each program is silent only once its hang exists (hangprog.ready()).
TIMEOUT = "5"
END_SECONDS = 60  # for a node's processes to be gone after watch ended the job


def job(nodes, mode: str, tmp_path: Path) -> tuple[list[str], dict[str, str]]:
    """hangkit watch on node 0 over 4 ranks of multinode_train.py MODE, 2 a node."""
    ready = tmp_path / "ready"
    ready.mkdir(exist_ok=True)
    argv = [HANGKIT, "watch", "--timeout", TIMEOUT, "--grace", "5",
            "--bind", nodes.addresses[nodes.hosts[0]], "--report-dir", str(tmp_path / "report"),
            "--", MPIEXEC, "-n", "4", "-ppn", "2", "--hostfile", str(nodes.nodefile),
            HANGKIT, "rank", "--", sys.executable, PROGRAM, mode]
    env = nodes.env(MASTER_ADDR=nodes.hosts[0], MASTER_PORT=str(free_port()),
                    HANGKIT_READY_DIR=str(ready))
    return argv, env


def report(tmp_path: Path) -> dict:
    return json.loads((tmp_path / "report" / "hang-report.json").read_text())


def snapshot(rep: dict, rank: int, role: str = "rank") -> list[dict]:
    return [p for p in rep["processes"] if p["rank"] == rank and p["role"] == role]


def nothing_left(nodes) -> None:
    simnodes.wait_for("every process of the job gone from both nodes", nodes.leftovers,
                      lambda left: not left, timeout=END_SECONDS)


def caught(nodes, mode: str, tmp_path: Path) -> tuple[subprocess.CompletedProcess, dict]:
    argv, env = job(nodes, mode, tmp_path)
    done = nodes.run(0, argv, env=env, timeout=240)
    assert done.returncode == 124, done.stderr[-4000:]
    nothing_left(nodes)
    return done, report(tmp_path)


def assert_both_nodes_captured(rep: dict) -> None:
    by_host = {n["host"]: n for n in rep["nodes"]}
    assert set(by_host) == {"hknode0", "hknode1"}, rep["nodes"]
    assert all(n["answered"] for n in by_host.values()), rep["nodes"]
    for rank, host in ((0, "hknode0"), (1, "hknode0"), (2, "hknode1"), (3, "hknode1")):
        (main,) = snapshot(rep, rank)
        assert main["host"] == host, main
        assert main["threads"], main  # stacks, wherever the rank runs


@pytest.mark.timeout(300)
def test_a_rank_on_node_1_skips_a_collective(nodes, tmp_path):
    done, rep = caught(nodes, "skip", tmp_path)
    assert_both_nodes_captured(rep)
    (first, *_) = rep["diagnosis"]
    assert first["kind"] == "TD-01" and first["ranks"] == [3], first
    assert "rank 3 never issued it" in first["summary"], first["summary"]
    assert "read_checkpoint" in first["summary"], first["summary"]
    # Every rank's Flight Recorder dump came back, node 1's through its relay.
    assert all(snapshot(rep, r)[0]["recording"]["dump"] for r in range(4)), rep["processes"]
    assert "Nodes (each captured by its relay):" in done.stderr


@pytest.mark.timeout(300)
def test_a_dataloader_worker_on_node_1_stuck_in_its_dataset(nodes, tmp_path):
    done, rep = caught(nodes, "worker", tmp_path)
    assert_both_nodes_captured(rep)
    workers = snapshot(rep, 3, "dataloader-worker")
    assert len(workers) == 2 and {w["host"] for w in workers} == {"hknode1"}, workers
    stuck = [w for w in workers if w["fetching"]]
    assert len(stuck) == 1 and "13" in stuck[0]["fetching"], workers
    dl01 = [d for d in rep["diagnosis"] if d["kind"] == "DL-01"]
    assert dl01 and dl01[0]["ranks"] == [3], rep["diagnosis"]
    assert f"pid {stuck[0]['pid']}" in dl01[0]["summary"], dl01[0]["summary"]
    # Node 0's workers too, each with its own rank's number.
    assert len(snapshot(rep, 0, "dataloader-worker")) == 2, rep["processes"]


@pytest.mark.timeout(300)
def test_a_rank_on_node_1_holding_the_gil(nodes, tmp_path):
    done, rep = caught(nodes, "gil", tmp_path)
    assert_both_nodes_captured(rep)
    (rank3,) = snapshot(rep, 3)
    # Its agent could not answer: its shim had faulthandler dump it, on its own node.
    assert rank3["stacks_from"] in ("faulthandler", "py-spy"), rank3
    main = next(t for t in rank3["threads"] if t["is_main"])
    assert any(f["function"].endswith("hold_the_gil") for f in main["frames"]), main
    (first, *_) = rep["diagnosis"]
    assert first["ranks"] == [3], first
    assert "rank 3 sent no recorder dump (its agent did not answer: its main thread holds " \
           "the GIL): it is in hold_the_gil" in first["summary"], first["summary"]


@pytest.mark.timeout(300)
def test_node_1_relay_killed_the_monitor_names_the_silent_node(nodes, tmp_path):
    argv, env = job(nodes, "steady", tmp_path)
    watch = nodes.popen(0, argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        simnodes.wait_for("4 ranks training", lambda: sorted(
            (tmp_path / "ready").glob("pid-*-training.json")), lambda f: len(f) == 4,
            timeout=180)
        (relay,) = [p for p in nodes.processes(1) if "hangkit.shim.relay" in p.cmdline()]
        relay.kill()
        err = read_until(watch, "[node-silent] hknode1", timeout=60)
        assert "ranks 2,3 there are no longer observed" in err, err
        (tmp_path / "ready" / "hang-now").touch()  # rank 1, on node 0, now wanders off
        out, rest = watch.communicate(timeout=180)
    finally:
        if watch.poll() is None:
            watch.kill()
            watch.wait(timeout=30)
    err += rest.decode(errors="replace")
    assert watch.returncode == 124, err[-4000:]
    assert "[dead]" not in err, err[-4000:]  # unobserved is not dead
    rep = report(tmp_path)
    by_host = {n["host"]: n for n in rep["nodes"]}
    assert by_host["hknode0"]["answered"] and not by_host["hknode1"]["answered"], rep["nodes"]
    assert "its relay" in by_host["hknode1"]["note"], by_host["hknode1"]
    for rank in (2, 3):  # named, with why, never dropped
        (placeholder,) = snapshot(rep, rank)
        assert "hknode1" in placeholder["note"], placeholder
    assert "hknode1: its relay is silent; its processes end with their launcher" in err, err
    nothing_left(nodes)


def read_until(proc: subprocess.Popen, marker: str, *, timeout: float) -> str:
    """proc's stderr until a line holds `marker`; what was read. AssertionError with it past
    the timeout, or if proc ends first."""
    text, fd = b"", proc.stderr.fileno()
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        while marker.encode() not in text:
            left = deadline - time.monotonic()
            assert left > 0, f"no {marker!r} within {timeout:.0f} s:\n{text.decode()[-4000:]}"
            if sel.select(timeout=left):
                chunk = proc.stderr.read1(1 << 16)
                assert chunk, f"ended ({proc.poll()}) before {marker!r}:\n{text.decode()[-4000:]}"
                text += chunk
    return text.decode(errors="replace")


@pytest.mark.timeout(400)
def test_engine_cluster_with_engines_on_two_nodes(nodes, tmp_path):
    program = str(PROGRAMS / "multinode_cluster.py")
    # ipyparallel's profile on the shared filesystem, as $HOME/.ipython is on a cluster.
    done = nodes.run(0, [sys.executable, program, nodes.addresses[nodes.hosts[0]]],
                     env=nodes.env(IPYTHONDIR=str(tmp_path / "ipython")), timeout=360)
    assert done.returncode == 0, done.stderr[-4000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    hosts = {"0": "hknode0", "1": "hknode0", "2": "hknode1", "3": "hknode1"}
    assert out["engines"] == hosts and out["pulled"] == hosts, out
    assert out["nodes"] == ["hknode0", "hknode1"], out  # a relay on each node
    (mp02, *_) = out["diagnosis"]
    assert mp02["kind"] == "MP-02" and mp02["ranks"] == [3], out["diagnosis"]
    assert [sorted(r) for r, _ in out["where"]] == [[0, 1, 2], [3]] or \
        [sorted(r) for r, _ in out["where"]] == [[3], [0, 1, 2]], out["where"]
    # SIGINT reached rank 3 on node 1 through its shim; the Barrier needed more.
    (sigint, *rest) = out["interrupt"]
    assert sigint.startswith("SIGINT to ranks 0-3: rank 3 stopped"), out["interrupt"]
    assert any(line.startswith("SIGTERM") for line in rest), out["interrupt"]
    nothing_left(nodes)


@pytest.mark.timeout(300)
def test_doctor_with_ranks_across_nodes(nodes, tmp_path):
    report_path = tmp_path / "doctor.json"
    done = nodes.run(0, [HANGKIT, "doctor", "--ranks", "4", "--only", "mpi,environment",
                         "--timeout", "120", "--json", str(report_path)],
                     env=nodes.env(), cwd=tmp_path, timeout=280)
    results = json.loads(report_path.read_text())["probes"]
    mpi = {r["rank"]: r for r in results if r["name"] == "mpi"}
    # Every rank's result came back, node 1's through the shared directory.
    assert sorted(mpi) == [0, 1, 2, 3], (results, done.stderr[-3000:])
    assert all(r["status"] == "ok" for r in mpi.values()), mpi
    assert not list(tmp_path.glob(".hangkit-doctor-*")), "the doctor left its results behind"
    nothing_left(nodes)


@pytest.mark.timeout(300)
def test_the_job_script_body_runs_with_a_node_file(nodes, tmp_path):
    from hangkit.polaris.jobscript import main as write_job

    script = tmp_path / "run_polaris.sh"
    assert write_job(["--account", "MyProj", "--ppn", "2", "--nodes", "2", "--hang-timeout",
                      TIMEOUT, "--out", str(script), "--", sys.executable, PROGRAM, "skip"]) == 0
    ready = tmp_path / "ready"
    ready.mkdir()
    # PBS as on the job's first node; hydra for PALS (it reads PBS_NODEFILE), without PALS's
    # --depth and --cpu-bind; the monitor on node 0's address only.
    path = f"{Path(sys.executable).parent}:{nodes.env()['PATH']}"  # the environment with hangkit
    env = nodes.env(PATH=path, PBS_O_WORKDIR=str(tmp_path), PBS_JOBID="4242.polaris",
                    HANGKIT_MPIEXEC=MPIEXEC, HANGKIT_MPIEXEC_FLAGS="-ppn 2",
                    HANGKIT_WATCH_BIND=nodes.addresses[nodes.hosts[0]],
                    MASTER_PORT=str(free_port()), HANGKIT_READY_DIR=str(ready))
    done = nodes.run(0, ["bash", str(script)], env=env, timeout=280)
    assert done.returncode == 124, done.stderr[-4000:]
    (found,) = tmp_path.glob("hangkit-report-*/hang-report.json")
    rep = json.loads(found.read_text())
    assert_both_nodes_captured(rep)
    assert rep["diagnosis"][0]["ranks"] == [3], rep["diagnosis"]
    # Each rank got the GPU of its local rank, and a TMPDIR on its own node, from its shim.
    seen = {r["rank"]: (r["host"], r["gpu"], r["tmpdir"]) for r in map(
        json.loads, (p.read_text() for p in ready.glob("pid-*-training.json")))}
    assert seen == {0: ("hknode0", "0", True), 1: ("hknode0", "1", True),
                    2: ("hknode1", "0", True), 3: ("hknode1", "1", True)}, seen
    nothing_left(nodes)
    # Nor in either node's /tmp: the TMPDIR (the script's trap on node 0, the relay on node 1,
    # where a shim made it), the relays' sockets and locks.
    for node in (0, 1):
        listed = nodes.run(node, ["ls", "-a", "/tmp"], timeout=60).stdout.split()
        assert not [name for name in listed if name.startswith("hk-")], (node, listed)
