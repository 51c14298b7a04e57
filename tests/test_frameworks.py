"""Plain training scripts on real frameworks, none of which imports hangkit, hung for real under
`hangkit watch`: every rank gets an agent with no code change (hangkit/bootstrap.py), so every
rank's Flight Recorder dump reaches the report and the verdict names the collective and its
sequence number, each side's call at its line of the user's script, and the odd rank. The
programs and where each rank waits: tests/programs/frameworks/README.md; how each is launched
and the verdict it must get: tests/programs/frameworks/cases.py."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from conftest import PROGRAMS, mpiexec
from test_watch_hangs import HANG

sys.path.insert(0, str(PROGRAMS / "frameworks"))
from cases import CASES, Case, command, line_of  # noqa: E402

WATCH = ["--timeout", "5", "--grace", "2"]


def hung(run_watch, tmp_path: Path, case: Case) -> dict:
    # The job's temporary files (torchrun's log directory, inductor's cache, multiprocessing's
    # pymp-*) go under the test's directory: what a killed job leaves is gone with it.
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    argv, env = command(case, tmp_path)
    run = run_watch(argv, options=WATCH, timeout=200, env={"TMPDIR": str(tmp), **env})
    assert run.returncode == HANG, run.err[-3000:]
    return run.report


def dumps(report: dict) -> dict[int, dict]:
    """Each rank's Flight Recorder dump, by rank; every rank process must have one."""
    ranks = [p for p in report["processes"] if p["role"] == "rank"]
    missing = [(p["rank"], p["pid"], (p.get("recording") or {}).get("error"), p.get("no_agent"))
               for p in ranks if not (p.get("recording") or {}).get("dump")]
    assert not missing, f"ranks without a dump: {missing}"
    return {p["rank"]: p["recording"]["dump"] for p in ranks}


def last_issued(dump: dict, group: str = "0") -> int:
    return int(dump["pg_status"][group]["last_enqueued_collective"])


def at(case: Case, text: str) -> str:
    return f"`{text}` at {case.script}:{line_of(case, text)}"


def verdict(report: dict, case: Case) -> tuple[dict, int]:
    """The first diagnosis, checked to name the case's kind and odd ranks; and the sequence
    number every rank issued last (the same on every rank: the disagreement)."""
    recorded = dumps(report)
    assert sorted(recorded) == list(range(case.world))
    (seq,) = {last_issued(d) for d in recorded.values()}
    first = report["diagnosis"][0]
    assert first["kind"] == case.verdict and first["ranks"] == list(case.odd), \
        report["diagnosis"]
    first["summary"] = first["summary"].replace(str(PROGRAMS / "frameworks") + "/", "")
    return first, seq


def assert_mismatch_at_the_odd_ranks_call(report: dict, case: Case, *, odd_op: str,
                                          op: str) -> None:
    """The odd rank issued `odd_op` under a rank-dependent branch, the others `op`, at the
    same sequence number: the mismatch, each side at its line, and the branch."""
    first, seq = verdict(report, case)
    (odd,) = case.odd
    others = ",".join(str(r) for r in range(case.world) if r != odd)
    assert first["summary"].startswith(
        f"Ranks disagree on collective #{seq} of the default group: rank {odd} {odd_op} (from "
        f"{at(case, case.odd_line)}; under {at(case, case.branch)}); ranks {others} {op} "), \
        first["summary"]
    assert f"from {at(case, case.others_line)})" in first["summary"]


def assert_uneven(report: dict, case: Case, *, op: str, steps: int, purpose: str = "") -> None:
    """The odd rank left the training loop for another collective after `steps` steps; the
    others wait in their next step's `op`: TD-06, with both lines."""
    first, seq = verdict(report, case)
    (odd,) = case.odd
    others = ",".join(str(r) for r in range(case.world) if r != odd)
    assert first["summary"] == (
        f"Uneven inputs: rank {odd} ran out of batches after {steps} training steps and waits "
        f"in barrier #{seq} of the default group (from {at(case, case.odd_line)}), while "
        f"ranks {others} wait in {op} #{seq} of their step {steps + 1} ({purpose}from "
        f"{at(case, case.others_line)})"), first["summary"]


@pytest.mark.timeout(240)
@pytest.mark.parametrize("name", ["ddp-torchrun", "ddp-mpiexec"])
def test_ddp_rank_that_skips_a_step(run_watch, tmp_path, name):
    if name == "ddp-mpiexec":
        mpiexec()  # skips where the local-mpi extra is missing
    report = hung(run_watch, tmp_path, CASES[name])
    assert_uneven(report, CASES[name], op="all_reduce", steps=5,
                  purpose="DDP's gradient bucket; ")


@pytest.mark.timeout(240)
def test_fsdp2_rank_that_skips_a_forward(run_watch, tmp_path):
    case = CASES["fsdp2-torchrun"]
    assert_uneven(hung(run_watch, tmp_path, case), case, op="all_gather", steps=5)


@pytest.mark.timeout(240)
def test_lightning_rank_0_saves_a_checkpoint_alone(run_watch, tmp_path):
    """Lightning's own launcher: ranks 1 and 2 are the script run again with LOCAL_RANK only;
    every rank is numbered from its process group."""
    case = CASES["lightning"]
    report = hung(run_watch, tmp_path, case)
    assert sorted(r["rank"] for r in report["ranks"]) == [0, 1, 2]
    assert_mismatch_at_the_odd_ranks_call(report, case, odd_op="barrier no tensors",
                                          op="broadcast")


@pytest.mark.timeout(240)
def test_accelerate_wait_for_everyone_on_the_main_process_only(run_watch, tmp_path):
    case = CASES["accelerate"]
    assert_mismatch_at_the_odd_ranks_call(hung(run_watch, tmp_path, case), case,
                                          odd_op="barrier no tensors", op="all_reduce")


@pytest.mark.timeout(240)
def test_hf_trainer_evaluates_on_the_main_process_only(run_watch, tmp_path):
    case = CASES["hf-trainer"]
    assert_mismatch_at_the_odd_ranks_call(hung(run_watch, tmp_path, case), case,
                                          odd_op="all_gather Float[4]", op="broadcast")
