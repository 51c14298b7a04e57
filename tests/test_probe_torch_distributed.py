"""The doctor's torch_distributed probe with real gloo process groups on real MPICH ranks:
passing on two ranks and on one, and TD-05 rendezvous that cannot complete (a WORLD_SIZE
larger than the ranks launched, a MASTER_ADDR that is not rank 0's host, a MASTER_PORT held
by another process), each reported by the probe itself, with the step it reached, within the
doctor's deadline."""

from __future__ import annotations

import importlib.util
import os
import socket
import sys
import time
from pathlib import Path

import pytest

from hangkit.probes.runner import run_doctor

if importlib.util.find_spec("torch") is None:  # not imported here: the probe's children do
    pytest.skip("torch is not installed", allow_module_level=True)

# What a user may have exported; each test sets what it needs.
USER_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK",
                  "PBS_NODEFILE", "PBS_JOBID", "TORCH_CPP_LOG_LEVEL")


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch):
    for name in USER_VARIABLES:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def mpiexec():
    path = Path(sys.executable).with_name("mpiexec")
    if not path.exists():
        pytest.skip("mpiexec not installed (the local-mpi extra)")
    pytest.importorskip("mpi4py")
    return str(path)


def statuses(results):
    return [(r.rank, r.status) for r in results]


def test_passes_on_two_ranks(mpiexec):
    results = run_doctor(["torch_distributed"], ranks=2, timeout=40)
    assert statuses(results) == [(0, "ok"), (1, "ok")], results
    ports = set()
    for r in results:
        assert r.data["world_size"] == 2 and r.data["rank"] == r.rank, r
        # No MASTER_PORT was given: rank 0 chose one and shared it through MPI.
        assert r.data["master_port_from"] == "a free port rank 0 shared through MPI"
        assert set(r.data["seconds"]) >= {"store", "process group", "all_reduce", "barrier"}
        assert r.detail.startswith("gloo on 2 rank(s), store at 127.0.0.1:"), r.detail
        ports.add(r.data["master_port"])
    assert len(ports) == 1
    # nccl runs where GPUs are visible; here it says why not.
    assert all("; nccl: " in r.detail for r in results)


def test_passes_without_ranks_as_one_process():
    (result,) = run_doctor(["torch_distributed"], timeout=40)
    assert (result.rank, result.status) == (None, "ok"), result
    assert result.data["world_size"] == 1 and result.data["master_addr"] == "127.0.0.1"
    assert result.detail.startswith("gloo on 1 rank(s)"), result.detail


def test_the_first_host_of_pbs_nodefile_is_master_addr(mpiexec, monkeypatch, tmp_path):
    # PBS faked: a node file whose first host is this machine, as qsub writes it. Hydra
    # reads PBS_NODEFILE too, and the default launcher passes it as --hostfile, either of
    # which would send a rank by ssh to the second, imaginary, host: so both ranks are
    # started here, by fork.
    nodefile = tmp_path / "nodefile"
    nodefile.write_text(f"{socket.gethostname()}\nx3006c0s13b0n0.example\n")
    monkeypatch.setenv("PBS_NODEFILE", str(nodefile))
    monkeypatch.setenv("MASTER_ADDR", "192.0.2.1")  # ignored in a PBS job, and said so
    results = run_doctor(["torch_distributed"], ranks=2, timeout=40,
                         launcher=[mpiexec, "-launcher", "fork", "-hosts", "localhost", "-n", "2"])
    assert statuses(results) == [(0, "warn"), (1, "warn")], results
    for r in results:
        assert r.data["master_addr"] == socket.gethostname()
        assert r.data["master_addr_from"] == "first host of PBS_NODEFILE"
        assert "MASTER_ADDR=192.0.2.1 in the environment is not the first host" in r.detail
        assert "gloo on 2 rank(s)" in r.detail, r.detail  # and the group did form


def test_world_size_larger_than_the_ranks_launched_is_td05(mpiexec, monkeypatch):
    # As a job script that exports WORLD_SIZE=3 and launches 2 ranks: env:// would wait for
    # the third rank for 30 minutes; the probe waits for it for real, until its deadline.
    monkeypatch.setenv("WORLD_SIZE", "3")
    started = time.monotonic()
    results = run_doctor(["torch_distributed"], ranks=2, timeout=12)
    wall = time.monotonic() - started
    rank0, rank1 = results
    assert statuses(results) == [(0, "timeout"), (1, "timeout")], results
    # Rank 0 hosts the store and waits there for the third rank; rank 1 joined the store
    # and waits in the process group for rank 0.
    assert rank0.detail.startswith("store step failed after"), rank0.detail
    assert "2/3 clients joined" in rank0.detail
    assert rank1.detail.startswith("process group step failed after"), rank1.detail
    for r in results:
        assert "TD-05" in r.advice
        assert ("WORLD_SIZE=3 in the environment, but the launcher started this process as "
                f"rank {r.rank} of 2") in r.detail
        assert r.seconds < 12
    assert wall < 12 + 3, f"the doctor took {wall:.1f} s with a 12 s deadline"


def test_master_addr_that_is_not_rank_0s_host_is_td05(mpiexec, monkeypatch):
    # 192.0.2.1 (TEST-NET-1) is nobody's address: rank 0 finds at once that it cannot host the
    # store there, while rank 1 really tries to reach it until its deadline (where a proxy
    # answers for every address, the store's handshake fails instead).
    monkeypatch.setenv("MASTER_ADDR", "192.0.2.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    started = time.monotonic()
    results = run_doctor(["torch_distributed"], ranks=2, timeout=10)
    wall = time.monotonic() - started
    rank0, rank1 = results
    assert (rank0.rank, rank0.status) == (0, "fail"), rank0
    assert rank0.detail.startswith("MASTER_ADDR=192.0.2.1 is not an address of rank 0's host")
    assert (rank1.rank, rank1.status) in [(1, "timeout"), (1, "fail")], rank1
    assert rank1.detail.startswith("store step failed after"), rank1.detail
    assert "192.0.2.1" in rank1.detail
    assert all("TD-05" in r.advice for r in results)
    assert rank1.seconds < 10
    assert wall < 10 + 3, f"the doctor took {wall:.1f} s with a 10 s deadline"


def test_master_port_held_by_another_process_is_td05_naming_it(monkeypatch):
    # This test's process holds the port, as an earlier notebook cell's store would.
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        monkeypatch.setenv("MASTER_PORT", str(port))
        (result,) = run_doctor(["torch_distributed"], timeout=40)
    assert result.status == "fail", result
    assert result.detail.startswith(f"store step: MASTER_PORT {port} is already in use by "
                                    f"pid {os.getpid()} "), result.detail
    assert "EADDRINUSE" in result.detail and "TD-05" in result.advice


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
