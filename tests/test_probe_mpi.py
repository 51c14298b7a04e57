"""The doctor's mpi probe on real MPICH ranks: passing on two ranks, warning about a singleton
(MP-05), and a rank that never joins, or joins but never reaches the collective (MP-02), found
within the doctor's deadline and attributed to the step it was in."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import TAG_VARIABLE, tagged_processes

from hangkit.probes.mpi import LAUNCHER_VARIABLES
from hangkit.probes.runner import REAP_SECONDS, run_doctor

MPMD = Path(__file__).parent / "programs" / "probes_dist" / "mpmd_missing_rank.py"

pytest.importorskip("mpi4py")


@pytest.fixture(autouse=True)
def _mpiexec():
    if not Path(sys.executable).with_name("mpiexec").exists():
        pytest.skip("mpiexec not installed (the local-mpi extra)")


@pytest.fixture
def no_launcher(monkeypatch):
    """The doctor's children as from a shell, even if pytest itself runs under mpiexec."""
    for name in (*LAUNCHER_VARIABLES, "PMI_SIZE", "PMI_FD", "PMI_PORT"):
        monkeypatch.delenv(name, raising=False)


def assert_job_ends(timeout: float = 10) -> None:
    """The doctor kills mpiexec at the deadline; hydra runs its proxy and each rank in a
    session of their own, and the proxy ends the ranks once it sees mpiexec gone: soon, but
    not by the time run_doctor returns. Everything must be gone within `timeout`."""
    job = tagged_processes(os.environ[TAG_VARIABLE])
    _, alive = psutil.wait_procs(job, timeout=timeout)
    assert not alive, f"still running {timeout:g} s after the doctor returned: {alive}"


def test_mpi_passes_on_two_ranks(no_launcher):
    results = run_doctor(["mpi"], ranks=2, timeout=30)
    assert [(r.name, r.rank, r.status) for r in results] == [("mpi", 0, "ok"), ("mpi", 1, "ok")]
    for r in results:
        assert r.data["world_size"] == 2 and r.data["rank"] == r.rank, r
        assert r.detail.startswith("world size 2, MPICH"), r.detail
        assert set(r.data["seconds"]) == {"init", "allreduce", "barrier"}


def test_mpi_without_a_launcher_is_a_singleton_warning(no_launcher):
    (result,) = run_doctor(["mpi"], timeout=30)
    assert (result.rank, result.status) == (None, "warn"), result
    assert result.detail.startswith("singleton MPI: not started by mpiexec"), result.detail
    assert "world size 1" in result.detail
    assert "MP-05" in result.advice and "ipyparallel" in result.advice
    assert result.data["singleton"] is True and result.data["world_size"] == 1


def test_a_rank_that_never_calls_mpi_init_leaves_rank_0_in_mpi_init(no_launcher):
    # A real MPMD job of two ranks: rank 0 is the probe, rank 1 a Python that never calls
    # MPI_Init. MPI_Init holds the GIL in C and cannot be interrupted, so the doctor kills the
    # job at its deadline and reports the probe's last progress line.
    started = time.monotonic()
    results = run_doctor(["mpi"], ranks=2, timeout=8,
                         launcher=[sys.executable, str(MPMD), "never-init"])
    wall = time.monotonic() - started
    assert [(r.rank, r.status) for r in results] == [(0, "timeout"), (1, "timeout")], results
    assert results[0].detail.startswith("did not finish within 8 s; last words: mpi: rank 0/2:"
                                        " MPI_Init_thread"), results[0].detail
    assert wall < 8 + REAP_SECONDS + 3, f"the doctor took {wall:.1f} s with an 8 s deadline"
    assert_job_ends()


def test_a_rank_that_skips_the_collective_is_reported_by_the_probe_itself(no_launcher):
    # Rank 1 passes MPI_Init and then waits in no collective: rank 0's non-blocking allreduce,
    # polled against the deadline, gives up before the doctor has to kill it.
    started = time.monotonic()
    results = run_doctor(["mpi"], ranks=2, timeout=8,
                         launcher=[sys.executable, str(MPMD), "init-only"])
    wall = time.monotonic() - started
    rank0, rank1 = results
    assert (rank0.rank, rank0.status) == (0, "timeout"), rank0
    assert rank0.detail.startswith("allreduce did not complete within"), rank0.detail
    assert "on rank 0 of 2" in rank0.detail and "MP-02" in rank0.advice
    assert rank0.seconds < 8, rank0
    assert (rank1.rank, rank1.status) == (1, "timeout"), rank1  # it never writes a result
    assert wall < 8 + REAP_SECONDS + 3, f"the doctor took {wall:.1f} s with an 8 s deadline"
    assert_job_ends()


def test_a_doctor_run_inside_a_rank_without_ranks_does_not_init_mpi(no_launcher, monkeypatch):
    # As `mpiexec -n 1 hangkit doctor` would leave it: the doctor's child inherits a rank's
    # variables (faked here) but not its connection to the launcher, where MPI_Init would
    # fail or wait; the probe says to use --ranks instead.
    monkeypatch.setenv("PMI_RANK", "0")
    monkeypatch.setenv("PMI_SIZE", "1")
    (result,) = run_doctor(["mpi"], timeout=30)
    assert result.status == "warn", result
    assert "without --ranks" in result.detail and "--ranks N" in result.advice
