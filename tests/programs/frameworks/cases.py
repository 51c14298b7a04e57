"""How each framework program is launched, and the verdict it must get: one home for
tests/test_frameworks.py and benchmarks/bench_frameworks.py. Not a user's script: the harness."""

from __future__ import annotations

import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent


@dataclass(frozen=True)
class Case:
    name: str
    script: str
    world: int
    verdict: str  # the first diagnosis's kind
    odd: tuple[int, ...]  # the ranks it must name
    # where the odd ranks issued their call, and the others theirs (lines of the script)
    odd_line: str = ""
    others_line: str = ""
    branch: str = ""  # the rank-dependent if the odd ranks' call sits under
    extra: dict = field(default_factory=dict)


CASES = {c.name: c for c in [
    # A rank that skipped a batch runs out of them one step before the others.
    Case("ddp-torchrun", "ddp_skip_step.py", 3, "TD-06", (1,), "dist.barrier()",
         "loss.backward()"),
    Case("ddp-mpiexec", "ddp_skip_step.py", 3, "TD-06", (1,), "dist.barrier()",
         "loss.backward()"),
    Case("fsdp2-torchrun", "fsdp2_skip_forward.py", 3, "TD-06", (1,), "dist.barrier()",
         "loss = loss_fn(model(xb), yb)"),
    Case("lightning", "lightning_rank0_checkpoint.py", 3, "TD-02", (0,),
         "trainer.save_checkpoint(path)", "trainer.fit(TinyClassifier(), loader)",
         "if trainer.is_global_zero and batch_idx == 2:"),
    Case("accelerate", "accelerate_main_only_wait.py", 3, "TD-02", (0,),
         "accelerator.wait_for_everyone()", "accelerator.backward(loss)",
         "if step == 3 and accelerator.is_main_process:"),
    Case("hf-trainer", "hf_trainer_rank0_eval.py", 3, "TD-02", (0,),
         "metrics = self.trainer.evaluate()", "trainer.train()",
         "if state.global_step == self.step and state.is_world_process_zero:"),
    # A rank's script named like the launcher is still a rank.
    Case("torchrun-named", "torchrun_ddp_train.py", 3, "TD-01", (2,),
         "with open(fifo, \"rb\") as feed:", "loss.backward()"),
    Case("lightning-worker", "lightning_stuck_worker.py", 2, "TD-01", (1,)),
    Case("uneven-shards", "ddp_uneven_shards.py", 3, "TD-06", (2,), "dist.barrier()",
         "loss.backward()"),
    # One node of two launched: torchrun waits in rendezvous, no rank starts.
    Case("two-nodes", "torchrun_two_nodes.py", 2, "TD-05", ()),
    # Not a hang: a cold torch.compile, silent for tens of seconds after its first line.
    Case("compile", "compile_cold_start.py", 1, "", ()),
]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(case: Case, scratch: Path) -> tuple[list[str], dict[str, str]]:
    """(argv, extra environment) that launch the case as a user would, its files in scratch."""
    script = str(HERE / case.script)
    port = str(free_port())
    torchrun = [str(BIN / "torchrun"), "--nproc-per-node", str(case.world), "--master-port",
                port, script]
    if case.name in ("ddp-mpiexec", "uneven-shards"):
        return ([str(BIN / "mpiexec"), "-n", str(case.world), sys.executable, script],
                {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port})
    if case.name in ("lightning", "lightning-worker"):  # its own launcher: ranks 1.. are the
        return [sys.executable, script, str(scratch)], {"MASTER_PORT": port}  # script again
    if case.name == "two-nodes":
        return ([str(BIN / "torchrun"), "--nnodes", "2", "--nproc-per-node", str(case.world),
                 "--node-rank", "0", "--rdzv-backend", "c10d", "--rdzv-endpoint",
                 f"127.0.0.1:{port}", script], {})
    if case.name == "compile":  # a cold compile: a fresh cache every run
        cache = scratch / "inductor-cache"
        cache.mkdir(parents=True, exist_ok=True)
        return [sys.executable, script], {"TORCHINDUCTOR_CACHE_DIR": str(cache)}
    if case.name == "torchrun-named":
        return [*torchrun, str(scratch)], {}
    if case.name == "accelerate":
        return ([str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes",
                 str(case.world), "--num_machines", "1", "--mixed_precision", "no",
                 "--dynamo_backend", "no", "--main_process_port", port, script], {})
    if case.name == "hf-trainer":
        return [*torchrun, str(scratch)], {}
    return torchrun, {}


def line_of(case: Case, text: str) -> int:
    lines = (HERE / case.script).read_text().splitlines()
    return next(i for i, line in enumerate(lines, 1) if line.strip() == text)
