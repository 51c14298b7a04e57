"""environment: the variables and process state behind the most common hangs, before they bite.

- PYTHONUNBUFFERED: buffered output hides where a batch job stopped (and a tqdm bar or a log
  line that never reaches the file looks like a hang).
- OMP_NUM_THREADS: unset, every rank starts a thread per core: oversubscription that looks like
  a hang (IP-04), and OpenMP threads alive at fork time (DL-05).
- Threads alive at fork time: a Python with torch loaded and one op run, as a training process
  is when it forks DataLoader workers; more than one OS thread means a lock can be copied held
  into a worker (DL-04, DL-05).
- WANDB_*: listed (values of secrets never shown).
- NCCL_* and FI_*: listed; settings of the AWS OFI NCCL plugin that ALCF's Polaris notes report
  hanging some applications are flagged.
- CUDA_VISIBLE_DEVICES on a node with GPUs and several ranks: it must be set per rank before
  mpi4py is imported (MP-06, Polaris guidance), so ranks do not share GPU 0.
"""

from __future__ import annotations

import glob
import importlib.util

from hangkit.probes.api import Outcome, ProbeContext, ok, run_python, worst
from hangkit.redact import redact_environ

# Settings the ALCF Polaris notes on the AWS OFI NCCL plugin report hanging some applications.
NCCL_HANG_SETTINGS = {"NCCL_COLLNET_ENABLE": "1", "NCCL_NET_GDR_LEVEL": "PHB"}
LOCAL_SIZE_VARIABLES = ("PALS_LOCAL_SIZE", "MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE",
                        "LOCAL_WORLD_SIZE")
_THREADS_AT_FORK = """
import os, torch
torch.ones(256, 256) @ torch.ones(256, 256)  # starts the intra-op pool, as training does
print(len(os.listdir('/proc/self/task')), torch.get_num_threads())
"""


def run(ctx: ProbeContext) -> Outcome:
    env = ctx.environ
    parts: list[Outcome] = []
    if env.get("PYTHONUNBUFFERED") != "1":
        parts.append(Outcome("warn", "PYTHONUNBUFFERED is not 1",
                             "export PYTHONUNBUFFERED=1 (or python -u) so a log shows where a "
                             "job stopped, not where its buffer was last flushed."))
    if not env.get("OMP_NUM_THREADS"):
        parts.append(Outcome("warn", "OMP_NUM_THREADS is unset",
                             "export OMP_NUM_THREADS=1 (or cores / ranks per node): otherwise "
                             "every rank and DataLoader worker starts a thread per core (IP-04, "
                             "DL-05)."))
    parts.append(_threads_at_fork(ctx))
    parts.append(_cuda_visible_devices(env))
    nccl = _nccl(env)
    if nccl:
        parts.append(nccl)
    wandb = sorted(k for k in env if k.startswith("WANDB_"))
    shown = redact_environ({k: env[k] for k in wandb})
    problems = [p for p in parts if p.status != "ok"]
    summary = "; ".join(p.detail for p in (problems or parts) if p.detail)
    advice = " ".join(p.advice for p in problems if p.advice) or None
    data = {"wandb": shown, "nccl": {k: env[k] for k in env if k.startswith(("NCCL_", "FI_"))}}
    for p in parts:
        data.update(p.data)
    if wandb:
        summary += f"; WANDB: {', '.join(f'{k}={v}' for k, v in shown.items())}"
    return Outcome(worst(parts), summary, advice, data)


def _threads_at_fork(ctx: ProbeContext) -> Outcome:
    if importlib.util.find_spec("torch") is None:
        return ok("", threads_at_fork=None)
    child = run_python(_THREADS_AT_FORK, timeout=min(ctx.remaining(), 20.0), env=ctx.environ)
    if child.timed_out or child.returncode != 0:
        how = "did not finish" if child.timed_out else f"failed: {child.last_line()}"
        return Outcome("warn", f"could not count threads after importing torch ({how})",
                       "Run `python -c 'import torch'` alone: the imports probe times it.")
    threads, pool = map(int, child.stdout.split())
    if threads > 1:
        return Outcome("warn", f"{threads} threads alive when a DataLoader would fork (torch's "
                       f"intra-op pool: {pool})",
                       "A fork copies any lock another thread holds (DL-04, DL-05): use "
                       "DataLoader(multiprocessing_context='spawn' or 'forkserver'), or "
                       "OMP_NUM_THREADS=1 and torch.set_num_threads(1) before workers start.",
                       {"threads_at_fork": threads})
    return ok(f"1 thread at fork time (OMP_NUM_THREADS={ctx.environ.get('OMP_NUM_THREADS')})",
              threads_at_fork=threads)


def _cuda_visible_devices(env: dict[str, str]) -> Outcome:
    gpus = len(glob.glob("/dev/nvidia[0-9]*"))
    local = next((int(env[v]) for v in LOCAL_SIZE_VARIABLES if env.get(v, "").isdigit()), 1)
    if gpus and local > 1 and "CUDA_VISIBLE_DEVICES" not in env:
        return Outcome("warn", f"{local} ranks on a node with {gpus} GPUs and no "
                       "CUDA_VISIBLE_DEVICES",
                       "Set CUDA_VISIBLE_DEVICES per rank from its local rank in a wrapper "
                       "script, before Python imports mpi4py (MP-06; Polaris's "
                       "set_affinity_gpu_polaris.sh).", {"gpus": gpus})
    return ok("", gpus=gpus)


def _nccl(env: dict[str, str]) -> Outcome | None:
    risky = [f"{k}={env[k]}" for k, v in NCCL_HANG_SETTINGS.items() if env.get(k) == v]
    if risky:
        return Outcome("warn", f"{', '.join(risky)} set",
                       "ALCF's Polaris notes report these AWS OFI NCCL plugin settings hanging "
                       "some applications: if NCCL collectives hang, retry without them, one "
                       "at a time.")
    return None
