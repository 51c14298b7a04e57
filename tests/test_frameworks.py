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
from test_watch_hangs import HANG, assert_all_gone

sys.path.insert(0, str(PROGRAMS / "frameworks"))
from cases import CASES, Case, command, line_of  # noqa: E402

WATCH = ["--timeout", "5", "--grace", "2"]


def watched(run_watch, tmp_path: Path, case: Case, *options: str):
    # The job's temporary files (torchrun's log directory, inductor's cache, multiprocessing's
    # pymp-*) go under the test's directory: what a killed job leaves is gone with it.
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    argv, env = command(case, tmp_path)
    return run_watch(argv, options=[*WATCH, *options], timeout=200,
                     env={"TMPDIR": str(tmp), **env})


def hung(run_watch, tmp_path: Path, case: Case, *options: str) -> dict:
    run = watched(run_watch, tmp_path, case, *options)
    assert run.returncode == HANG, run.err[-3000:]
    assert_all_gone([p["pid"] for p in run.report["processes"]])
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
    """The first diagnosis, checked to name the case's kind and odd ranks; and the highest
    sequence number a rank issued (where the ranks disagree, every rank's)."""
    recorded = dumps(report)
    assert sorted(recorded) == list(range(case.world))
    issued = {last_issued(d) for d in recorded.values()}
    seq = max(issued)
    if case.verdict in ("TD-02", "TD-06"):
        assert issued == {seq}
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


@pytest.mark.timeout(240)
def test_a_ranks_script_named_like_the_launcher_is_a_rank(run_watch, tmp_path):
    case = CASES["torchrun-named"]
    report = hung(run_watch, tmp_path, case)
    first, seq = verdict(report, case)
    assert first["summary"].startswith(
        f"Ranks 0,1 wait in all_reduce #{seq} of the default group (DDP's gradient bucket; "
        f"from {at(case, case.others_line)}); rank 2 never issued it (its last was #{seq - 1})"
        f": it is in evaluate at {case.script}:{line_of(case, case.odd_line)} (blocked"), \
        first["summary"]
    roles = sorted(p["role"] for p in report["processes"])
    assert roles == ["launcher", "rank", "rank", "rank"]


@pytest.mark.timeout(240)
def test_lightning_rank_with_a_stuck_dataloader_worker(run_watch, tmp_path):
    """The worker of Lightning's spawned rank 1 (numbered from its process group) is stuck
    in the dataset: DL-01 names the rank, the worker and the indices."""
    case = CASES["lightning-worker"]
    report = hung(run_watch, tmp_path, case)
    first, seq = verdict(report, case)
    assert first["summary"].startswith(f"Rank 0 waits in all_reduce #{seq} of the default group")
    assert f"rank 1 never issued it (its last was #{seq - 1})" in first["summary"]
    (dl01,) = [d for d in report["diagnosis"] if d["kind"] == "DL-01"]
    (worker,) = [p for p in report["processes"] if p["role"] == "dataloader-worker"
                 and p["rank"] == 1 and p["pid"] in dl01["pids"]]
    assert dl01["ranks"] == [1] and dl01["summary"].startswith("rank 1 (pid ")
    assert f"worker pid {worker['pid']} is in SampleStore.read_from_storage" in dl01["summary"]
    assert "fetching index [56, " in dl01["summary"]


@pytest.mark.timeout(240)
def test_mpiexec_ddp_with_uneven_shards_says_who_ran_out_of_data_and_when(run_watch, tmp_path):
    mpiexec()
    case = CASES["uneven-shards"]
    report = hung(run_watch, tmp_path, case)
    assert_uneven(report, case, op="all_reduce", steps=4, purpose="DDP's gradient bucket; ")
    assert [d["kind"] for d in report["diagnosis"]] == ["TD-06"]  # no second telling


@pytest.mark.timeout(240)
def test_torchrun_with_a_node_missing_waits_in_rendezvous_td05(run_watch, tmp_path):
    """torchrun prints nothing while it waits: the start-up timeout calls it."""
    case = CASES["two-nodes"]
    report = hung(run_watch, tmp_path, case, "--startup-timeout", "10")
    (td05,) = [d for d in report["diagnosis"] if d["kind"] == "TD-05"]
    (agent,) = [p for p in report["processes"] if p["role"] == "launcher"]
    endpoint = next(w for w in agent["cmdline"] if w.startswith("127.0.0.1:"))
    assert td05["summary"].startswith(
        f"torchrun's elastic agent (pid {agent['pid']} on ")
    assert f"node rank 0) waits in rendezvous at {endpoint} (--nnodes 2) for " in td05["summary"]
    assert ": 1 of 2 nodes joined, so no rank has started" in td05["summary"]
    assert f"`torchrun --nnodes 2 --nproc-per-node 2 --node-rank 1 --rdzv-backend c10d " \
           f"--rdzv-endpoint {endpoint} " in td05["summary"]
    assert not [p for p in report["processes"] if p["role"] == "rank"]


@pytest.mark.timeout(300)
def test_a_cold_torch_compile_is_progress_not_a_hang(run_watch, tmp_path):
    """NH-04: seconds of silence after its first line while g++ builds the kernels; watch
    looks, sees the compile working, and lets it finish: exit 0, no report."""
    run = watched(run_watch, tmp_path, CASES["compile"])
    assert run.returncode == 0, run.err[-3000:]
    assert run.stdout.decode().splitlines()[-1] == "done"
    assert not run.report_dir.exists()


@pytest.mark.timeout(240)
@pytest.mark.parametrize(("name", "odd_op", "op", "purpose"), [
    ("accelerate", "barrier", "all_reduce",
     " (the gradient reduction of DDP or FSDP inside backward())"),
    ("hf-trainer", "all_gather", "broadcast", " (DDP's buffer broadcast)"),
    ("lightning", "barrier", "broadcast", ""),
])
def test_without_dumps_the_stacks_alone_find_the_mismatch_and_its_branch(
        run_watch, tmp_path, name, odd_op, op, purpose):
    """--no-inject: no agent, no recorder; py-spy's stacks and the table of what waiting in a
    collective looks like still say who is in which collective, under which branch, and never
    that the waiting ranks "never reached it". Lightning's launcher is its rank 0."""
    case = CASES[name]
    report = hung(run_watch, tmp_path, case, "--no-inject")
    assert report["ranks"] == []  # no agent beat
    assert sorted(p["rank"] for p in report["processes"] if p["role"] == "rank") == [0, 1, 2]
    first = report["diagnosis"][0]
    assert first["kind"] == "TD-02" and first["ranks"] == [0], report["diagnosis"]
    summary = first["summary"].replace(str(PROGRAMS / "frameworks") + "/", "")
    odd_line = line_of(case, case.odd_line)
    assert summary == (
        f"Ranks wait in different collectives: rank 0 in {odd_op} at {case.script}:{odd_line}, "
        f"under {at(case, case.branch)}; ranks 1,2 in {op}{purpose} at "
        f"{case.script}:{line_of(case, case.others_line)}"), summary
    assert "never reached" not in " ".join(d["summary"] for d in report["diagnosis"])
