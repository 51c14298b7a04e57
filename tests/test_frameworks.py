"""Plain training scripts on real frameworks, none of which imports hangkit, hung for real under
`hangkit watch`: every rank gets an agent with no code change (hangkit/bootstrap.py), so every
rank's Flight Recorder dump reaches the report and the verdict names the collective and its
sequence number. The programs and where each rank waits: tests/programs/frameworks/README.md."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from conftest import PROGRAMS, mpiexec
from test_watch_hangs import HANG

from hangkit.launcher import free_port

FRAMEWORKS = PROGRAMS / "frameworks"
BIN = Path(sys.executable).parent
WATCH = ["--timeout", "5", "--grace", "2"]


def torchrun(script: str, n: int = 3) -> list[str]:
    return [str(BIN / "torchrun"), "--nproc-per-node", str(n), "--master-port",
            str(free_port()), str(FRAMEWORKS / script)]


def hung(run_watch, tmp_path: Path, command: list[str], *, env: dict | None = None) -> dict:
    # The job's temporary files (torchrun's log directory, inductor's cache, multiprocessing's
    # pymp-*) go under the test's directory: what a killed job leaves is gone with it.
    tmp = tmp_path / "tmp"
    tmp.mkdir(exist_ok=True)
    run = run_watch(command, options=WATCH, timeout=200, env={"TMPDIR": str(tmp), **(env or {})})
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


def line_of(script: str, text: str) -> int:
    lines = (FRAMEWORKS / script).read_text().splitlines()
    return next(i for i, line in enumerate(lines, 1) if line.strip() == text)


def assert_mismatch_at_the_odd_ranks_call(report: dict, *, world: int, script: str, odd: int,
                                          odd_line: str, op: str, others_line: str,
                                          odd_op: str = "barrier no tensors") -> None:
    """Every rank issued the same sequence number, the odd one `odd_op`, the others `op`:
    the verdict is the mismatch, with the number, each side at its line of the user's
    script, and it blames the odd rank."""
    recorded = dumps(report)
    assert sorted(recorded) == list(range(world))
    seq = last_issued(recorded[odd])
    assert {last_issued(d) for d in recorded.values()} == {seq}
    first = report["diagnosis"][0]
    assert first["kind"] == "TD-02" and first["ranks"] == [odd], report["diagnosis"]
    summary = first["summary"]
    others = [r for r in range(world) if r != odd]
    assert summary.startswith(f"Ranks disagree on collective #{seq} of the default group: "
                              f"rank {odd} {odd_op} (from `{odd_line}` at "), summary
    assert f"{script}:{line_of(script, odd_line)}); " in summary
    assert f"; ranks {others[0]},{others[1]} {op} " in summary
    assert f"`{others_line}` at " in summary
    assert f"{script}:{line_of(script, others_line)})" in summary


@pytest.mark.timeout(240)
@pytest.mark.parametrize("launcher", ["torchrun", "mpiexec"])
def test_ddp_rank_that_skips_a_step(run_watch, tmp_path, launcher):
    script = "ddp_skip_step.py"
    if launcher == "torchrun":
        report = hung(run_watch, tmp_path, torchrun(script))
    else:
        report = hung(run_watch, tmp_path, [mpiexec(), "-n", "3", sys.executable,
                                  str(FRAMEWORKS / script)],
                      env={"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())})
    assert_mismatch_at_the_odd_ranks_call(report, world=3, script=script, odd=1,
                                          odd_line="dist.barrier()", op="all_reduce",
                                          others_line="loss.backward()")


@pytest.mark.timeout(240)
def test_fsdp2_rank_that_skips_a_forward(run_watch, tmp_path):
    script = "fsdp2_skip_forward.py"
    report = hung(run_watch, tmp_path, torchrun(script))
    assert_mismatch_at_the_odd_ranks_call(report, world=3, script=script, odd=1,
                                          odd_line="dist.barrier()", op="all_gather",
                                          others_line="loss = loss_fn(model(xb), yb)")


@pytest.mark.timeout(240)
def test_lightning_rank_0_saves_a_checkpoint_alone(run_watch, tmp_path):
    """Lightning's own launcher: ranks 1 and 2 are the script run again with LOCAL_RANK only;
    every rank is numbered from its process group."""
    script = "lightning_rank0_checkpoint.py"
    report = hung(run_watch, tmp_path, [sys.executable, str(FRAMEWORKS / script), str(tmp_path)],
                  env={"MASTER_PORT": str(free_port())})
    assert sorted(r["rank"] for r in report["ranks"]) == [0, 1, 2]
    assert_mismatch_at_the_odd_ranks_call(report, world=3, script=script, odd=0,
                                          odd_line="trainer.save_checkpoint(path)",
                                          op="broadcast",
                                          others_line="trainer.fit(TinyClassifier(), loader)")


@pytest.mark.timeout(240)
def test_accelerate_wait_for_everyone_on_the_main_process_only(run_watch, tmp_path):
    script = "accelerate_main_only_wait.py"
    report = hung(run_watch, tmp_path, [
        str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "3",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(free_port()), str(FRAMEWORKS / script)])
    assert_mismatch_at_the_odd_ranks_call(report, world=3, script=script, odd=0,
                                          odd_line="accelerator.wait_for_everyone()",
                                          op="all_reduce",
                                          others_line="accelerator.backward(loss)")


@pytest.mark.timeout(240)
def test_hf_trainer_evaluates_on_the_main_process_only(run_watch, tmp_path):
    script = "hf_trainer_rank0_eval.py"
    report = hung(run_watch, tmp_path, [*torchrun(script), str(tmp_path)])
    assert_mismatch_at_the_odd_ranks_call(report, world=3, script=script, odd=0,
                                          odd_op="all_gather Float[4]",
                                          odd_line="metrics = self.trainer.evaluate()",
                                          op="broadcast", others_line="trainer.train()")
