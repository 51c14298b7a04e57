"""polaris: the PBS job's shape against what training will ask of it. Skipped outside PBS.

- PBS_JOBID and PBS_NODEFILE present and readable (MASTER_ADDR comes from its first host).
- Ranks per node against GPUs per node (Polaris: 4 A100s): more ranks than GPUs share one.
- DataLoader workers x ranks per node against cores, and the --depth binding: a rank bound
  to `depth` cores whose workers need more oversubscribes them (IP-04).
- Proxy variables on compute nodes, without which trackers wait on the network (WJ-01).

Polaris's PALS sets PALS_LOCAL_SIZE (ranks on this node) and PALS_DEPTH is what
`mpiexec --depth` gives each rank; when unknown the probe says so rather than guess.
"""

from __future__ import annotations

import glob
import os

from hangkit.launcher import job_nodes
from hangkit.probes.api import Outcome, ProbeContext, fail, ok, skipped, warn, worst
from hangkit.probes.environment import LOCAL_SIZE_VARIABLES

GPUS_PER_NODE = 4  # Polaris: 4 A100s a node; used when no GPU is visible from here
PROXY_VARIABLES = ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY")


def run(ctx: ProbeContext) -> Outcome:
    env = ctx.environ
    if not env.get("PBS_JOBID"):
        return skipped("not inside a PBS job (no PBS_JOBID)")
    nodes = job_nodes(env)
    if not nodes:
        return fail(f"PBS_NODEFILE={env.get('PBS_NODEFILE')!r} is missing or empty",
                    "Run inside the job (qsub -I or a job script): MASTER_ADDR comes from the "
                    "first host of PBS_NODEFILE (TD-05).")
    parts = [ok(f"job {env['PBS_JOBID']} on {len(nodes)} node(s), first {nodes[0]}")]
    local = next((int(env[v]) for v in LOCAL_SIZE_VARIABLES if env.get(v, "").isdigit()), None)
    gpus = len(glob.glob("/dev/nvidia[0-9]*")) or GPUS_PER_NODE
    if local is None:
        parts.append(ok("ranks per node unknown here (run with --ranks to check them)"))
    elif local > gpus:
        parts.append(warn(f"{local} ranks per node share {gpus} GPUs",
                          f"Launch at most {gpus} ranks per node (mpiexec --ppn {gpus}), one "
                          "GPU each, with CUDA_VISIBLE_DEVICES set per rank (MP-06)."))
    else:
        parts.append(ok(f"{local} rank(s) per node for {gpus} GPUs"))
    cores = os.cpu_count() or 1
    workers = int(env.get("HANGKIT_DOCTOR_WORKERS", "4").split(",")[-1])
    depth = env.get("PALS_DEPTH") or env.get("OMP_NUM_THREADS")
    if local is not None and local * (1 + workers) > cores:
        parts.append(warn(f"{local} ranks x (1 + {workers} DataLoader workers) = "
                          f"{local * (1 + workers)} processes for {cores} cores",
                          "Use fewer workers per rank (cores / ranks per node - 1), and bind "
                          "each rank to enough cores: mpiexec --depth=<cores per rank> "
                          "--cpu-bind depth (IP-04)."))
    elif local is not None and depth and depth.isdigit() and int(depth) < 1 + workers:
        parts.append(warn(f"each rank is bound to {depth} core(s) but starts {workers} "
                          "DataLoader workers",
                          f"mpiexec --depth={1 + workers} --cpu-bind depth, or fewer workers."))
    if not any(env.get(v) for v in PROXY_VARIABLES):
        parts.append(warn("no proxy variables: trackers cannot reach the internet from "
                          "compute nodes",
                          "export https_proxy=http://proxy.alcf.anl.gov:3128 (and http_proxy) "
                          "in the job script, or WANDB_MODE=offline (WJ-01)."))
    problems = [p for p in parts if p.status != "ok"]
    detail = "; ".join(p.detail for p in (problems or parts))
    advice = " ".join(p.advice for p in problems if p.advice) or None
    return Outcome(worst(parts), detail, advice,
                   {"nodes": len(nodes), "ranks_per_node": local, "cores": cores})
