"""hangkit.training.distributed against real ranks: gloo groups started by a small launcher
here (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), and mpiexec jobs (MPICH from PyPI)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import TAG_VARIABLE, mpiexec, removing_left_shared_memory, tagged_processes

from hangkit.errors import HangkitError
from hangkit.launcher import free_port
from hangkit.training import distributed as hd

PROGRAMS = Path(__file__).parent / "programs" / "training_dist"
ROOT = Path(__file__).parent.parent
LAUNCHER_VARIABLES = ("PMI_RANK", "PMI_SIZE", "PMIX_RANK", "PMIX_SIZE", "OMPI_COMM_WORLD_RANK",
                      "OMPI_COMM_WORLD_SIZE", "PALS_RANKID", "PALS_SIZE", "PBS_NODEFILE",
                      "PBS_JOBID")


def base_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run_ranks(mode: str, out: Path, ranks, world_size: int, *, timeout: float = 40,
              **extra) -> tuple[list[int], float]:
    """Starts the given ranks of gloo_rank.py, waits for all (bounded); returns their exit
    codes and the wall time. Kills and reaps every rank in any case."""
    port = free_port()
    procs = []
    started = time.monotonic()
    try:
        for r in ranks:
            env = base_env(**{"RANK": r, "WORLD_SIZE": world_size, "MASTER_ADDR": "127.0.0.1",
                              "MASTER_PORT": port, **extra})
            with open(out / f"rank-{r}.log", "wb") as log:
                procs.append(subprocess.Popen(
                    [sys.executable, str(PROGRAMS / "gloo_rank.py"), mode, str(out)], env=env,
                    stdout=log, stderr=subprocess.STDOUT))
        codes = []
        for p in procs:
            left = max(started + timeout - time.monotonic(), 0.1)
            try:
                p.wait(timeout=left)
            except subprocess.TimeoutExpired:
                for q in procs:
                    q.kill()
                    q.wait(timeout=10)
                pytest.fail(f"ranks still running after {timeout} s: " + logs(out))
            codes.append(p.returncode)
        return codes, time.monotonic() - started
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait(timeout=10)


def logs(out: Path) -> str:
    return "\n".join(f"--- {p.name}\n" + p.read_text(errors="replace")[-1500:]
                     for p in sorted(out.glob("rank-*.log")))


def results(out: Path, ranks) -> dict[int, dict]:
    found = {}
    for r in ranks:
        path = out / f"rank-{r}.json"
        assert path.exists(), f"rank {r} wrote no result; have {sorted(os.listdir(out))}"
        found[r] = json.loads(path.read_text())
    return found


# -- pure parts ------------------------------------------------------------------------

def test_error_classes_refine_standard_exceptions():
    assert issubclass(hd.RendezvousTimeout, HangkitError)
    assert issubclass(hd.RendezvousTimeout, TimeoutError)
    assert issubclass(hd.BarrierTimeout, TimeoutError)
    assert issubclass(hd.PeerFailed, RuntimeError)
    assert issubclass(hd.UnevenBatches, ValueError)
    error = hd.PeerFailed({2: "Traceback...\nKeyError: 'x'\n", 1: "ValueError: boom\n"}, rank=0)
    assert str(error) == "ranks 1,2 failed: rank 1: ValueError: boom; rank 2: KeyError: 'x'"
    assert "[rank 2]" in error.render_tracebacks() and error.hint


def test_plan_takes_pbs_pals_and_explicit_values(tmp_path):
    nodefile = tmp_path / "nodes"
    nodefile.write_text("x3001c0s13b0n0.hsn\nx3001c0s13b0n0.hsn\nx3002c0s1b0n0.hsn\n")
    env = {"PALS_RANKID": "3", "PALS_SIZE": "8", "PBS_NODEFILE": str(nodefile),
           "PBS_JOBID": "123.polaris-pbs-01"}
    addr, port, rank, size = hd._plan(None, None, None, None, env)
    assert (addr, rank, size) == ("x3001c0s13b0n0.hsn", 3, 8)
    assert hd.DERIVED_PORT_BASE <= port < hd.DERIVED_PORT_BASE + hd.DERIVED_PORT_SPAN
    assert hd._plan("h", 5, 1, 2, env) == ("h", 5, 1, 2)
    with pytest.raises(hd.UsageError, match="MASTER_PORT"):
        hd._plan(None, None, 0, 2, {})
    with pytest.raises(ValueError, match="not below"):
        hd._plan("h", 5, 2, 2, {})


# -- real ranks ------------------------------------------------------------------------

def test_td05_world_size_larger_than_ranks_launched(tmp_path):
    """WORLD_SIZE=3, two ranks started: init raises within its deadline, naming who joined."""
    codes, took = run_ranks("rendezvous", tmp_path, [0, 1], 3, INIT_TIMEOUT=4)
    got = results(tmp_path, [0, 1])
    assert codes == [3, 3], got
    assert got[0]["error_type"] == "RendezvousTimeout"
    assert got[0]["message"].startswith("ranks 0,1 joined; rank 2 did not within 4 s"), got
    assert got[0]["attrs"]["missing"] == [2] and got[0]["attrs"]["joined"] == [0, 1]
    # Rank 1 either timed out itself or saw rank 0 go; either way it names who had joined.
    assert got[1]["error_type"] in ("RendezvousTimeout", "RendezvousError"), got[1]
    assert got[1]["attrs"]["joined"] in ([0, 1], []), got[1]
    assert got[0]["seconds"] < 15, got


def test_td05_no_store_at_master_addr(tmp_path):
    """Rank 1 alone (rank 0 never started): it says it could not reach the store there."""
    codes, _ = run_ranks("rendezvous", tmp_path, [1], 2, INIT_TIMEOUT=2)
    got = results(tmp_path, [1])[1]
    assert codes == [3]
    assert got["error_type"] == "RendezvousTimeout"
    assert "could not reach the store at 127.0.0.1:" in got["message"], got
    assert got["seconds"] < 12, got


def test_td05_port_held_by_another_process(tmp_path):
    """Rank 0 cannot open the store on a port that something else listens on: it says so."""
    import socket

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        codes, _ = run_ranks("rendezvous", tmp_path, [0], 1, INIT_TIMEOUT=4, MASTER_PORT=port)
    got = results(tmp_path, [0])[0]
    assert got["error_type"] == "RendezvousError", (got, logs(tmp_path))
    assert f"rank 0 could not open the store on 127.0.0.1:{port}" in got["message"], got
    assert got["seconds"] < 12, got


def test_td01_gloo_barrier_names_the_rank_that_skipped(tmp_path):
    codes, _ = run_ranks("barrier_skip", tmp_path, [0, 1, 2], 3)
    got = results(tmp_path, [0, 1, 2])
    assert got[2].get("skipped")
    for r in (0, 1):
        assert got[r]["error_type"] == "BarrierTimeout", got[r]
        assert "rank 2 did not arrive" in got[r]["message"], got[r]
        assert got[r]["attrs"]["missing"] == [2]
        assert got[r]["seconds"] < 15, got[r]


def test_td04_peer_failure_reaches_the_other_ranks(tmp_path):
    codes, _ = run_ranks("peer_failed", tmp_path, [0, 1, 2], 3)
    got = results(tmp_path, [0, 1, 2])
    assert got[1]["error_type"] == "ValueError" and got[1]["step"] == 3, got[1]
    for r in (0, 2):
        assert got[r]["error_type"] == "PeerFailed", got[r]
        assert got[r]["step"] == 3
        assert got[r]["message"] == ("rank 1 failed at step 3: rank 1: ValueError: boom on "
                                     "rank 1 at step 3"), got[r]
        # well within the ErrorFlag's 60 s collective timeout
        assert got[r]["seconds"] < 15, got[r]


def test_td06_uneven_batch_counts_named_before_the_epoch(tmp_path):
    codes, _ = run_ranks("uneven", tmp_path, [0, 1, 2], 3)
    got = results(tmp_path, [0, 1, 2])
    for r in (0, 1, 2):
        assert got[r]["error_type"] == "UnevenBatches", got[r]
        assert "ranks 0,2: 5 batches; rank 1: 6 batches" in got[r]["message"], got[r]
        assert got[r]["attrs"]["counts"] == {"0": 5, "1": 6, "2": 5}


def end_session(pgid: int) -> None:
    """Ends what is left of an mpiexec job (hydra's proxies and ranks can outlive mpiexec by
    a moment after an MPI_Abort): its session, then every process this test tagged."""
    with contextlib.suppress(OSError):
        os.killpg(pgid, signal.SIGKILL)
    left = tagged_processes(os.environ[TAG_VARIABLE])
    gone, alive = psutil.wait_procs(left, timeout=5)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(alive, timeout=5)


def _run_mpi(mode: str, out: Path, ranks: int, timeout: float):
    with removing_left_shared_memory():  # MPI_Abort, and ranks killed, leave MPICH's
        return _run_mpi_job(mode, out, ranks, timeout)


def _run_mpi_job(mode: str, out: Path, ranks: int, timeout: float):
    argv = [mpiexec(), "-n", str(ranks), sys.executable, str(PROGRAMS / "mpi_rank.py"), mode,
            str(out)]
    proc = subprocess.Popen(argv, env=base_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    started = time.monotonic()
    try:
        output, _ = proc.communicate(timeout=timeout)
        return proc.returncode, output.decode(errors="replace"), time.monotonic() - started
    except subprocess.TimeoutExpired:
        proc.kill()
        output, _ = proc.communicate(timeout=10)
        end_session(proc.pid)
        pytest.fail(f"mpiexec job still running after {timeout} s:\n"
                    + output.decode(errors="replace")[-3000:])
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        end_session(proc.pid)


def test_td01_mpi_barrier_names_the_rank_that_skipped(tmp_path):
    _, output, _ = _run_mpi("barrier_skip", tmp_path, 3, 40)
    got = results(tmp_path, [0, 1, 2])
    assert got[2].get("skipped"), output
    assert got[0]["error_type"] == "BarrierTimeout", (got, output)
    assert "rank 2 did not arrive" in got[0]["message"] and got[0]["missing"] == [2], got[0]
    assert got[1]["error_type"] == "BarrierTimeout", got[1]
    assert "rank 0 arrived" in got[1]["message"], got[1]
    assert max(got[r]["seconds"] for r in (0, 1)) < 15, got


def test_mp01_excepthook_aborts_the_job(tmp_path):
    code, output, took = _run_mpi("excepthook", tmp_path, 2, 40)
    assert code != 0, output
    assert "ValueError: boom on MPI rank 1" in output, output
    assert "unhandled exception on MPI rank 1 of 2" in output, output


def test_no_failure_path_on_gloo(tmp_path):
    """Barriers, guarded steps and even counts pass through when every rank does its part."""
    codes, _ = run_ranks("happy", tmp_path, [0, 1, 2], 3)
    got = results(tmp_path, [0, 1, 2])
    assert codes == [0, 0, 0], logs(tmp_path)
    for r in (0, 1, 2):
        assert "error_type" not in got[r], got[r]
        assert got[r]["counts"] == {"0": 5, "1": 5, "2": 5} and got[r]["checks"] == 5
    # in the subgroup of ranks 0 and 1, counts are keyed by global rank; uneven ones warn
    assert got[0]["pair_counts"] == got[1]["pair_counts"] == {"0": 0, "1": 1}
    assert "pair_counts" not in got[2]


def test_mpi_barrier_passes_when_all_arrive(tmp_path):
    code, output, _ = _run_mpi("barrier_ok", tmp_path, 3, 40)
    assert code == 0, output
    assert sorted(results(tmp_path, [0, 1, 2])) == [0, 1, 2]


def test_mp01_without_the_hook_the_job_hangs(tmp_path):
    """The control: the same job without install_mpi_excepthook() does not end by itself."""
    with removing_left_shared_memory():  # its ranks are killed: MPICH's segment stays
        _hangs_without_the_hook(tmp_path)


def _hangs_without_the_hook(tmp_path: Path) -> None:
    argv = [mpiexec(), "-n", "2", sys.executable, str(PROGRAMS / "mpi_rank.py"),
            "no_excepthook", str(tmp_path)]
    proc = subprocess.Popen(argv, env=base_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 20
        while len(list(tmp_path.glob("ready-*"))) < 2 and time.monotonic() < deadline:
            assert proc.poll() is None, proc.communicate()[0].decode(errors="replace")
            time.sleep(0.05)  # ok-sleep: polling for the ranks' ready files, with a deadline
        with pytest.raises(subprocess.TimeoutExpired):
            proc.wait(timeout=5)  # still hanging 5 s after both ranks started
    finally:
        proc.kill()
        proc.communicate(timeout=10)
        end_session(proc.pid)
