"""One rank of a gloo job using hangkit.training.distributed. Usage: gloo_rank.py MODE OUTDIR

RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT come from the test's launcher. Each rank writes
OUTDIR/rank-<r>.json: what it raised (type, message, attributes) and how long it waited.
Modes: barrier_skip (the last rank skips the barrier), peer_failed (rank 1 raises at step 3),
rendezvous (init only), uneven (rank r has 5 + r % 2 batches), happy (all of it, with no
failure: three barriers, five guarded steps, even batch counts).
"""

import json
import os
import sys
import time
from pathlib import Path

from hangkit.training import distributed as hd

mode, out = sys.argv[1], Path(sys.argv[2])
rank = int(os.environ["RANK"])
result = {"rank": rank}


def record(error=None, started=None, **extra):
    if error is not None:
        result.update(error_type=type(error).__name__, message=str(error),
                      attrs={k: v for k, v in vars(error).items()
                             if isinstance(v, (int, str, list, dict, float, type(None)))})
    if started is not None:
        result["seconds"] = round(time.monotonic() - started, 3)
    result.update(extra)
    (out / f"rank-{rank}.json.tmp").write_text(json.dumps(result))
    (out / f"rank-{rank}.json.tmp").rename(out / f"rank-{rank}.json")


def finish(size):
    """Rank 0 hosts the store: it stays until every rank has recorded its result. The group
    is destroyed first, as a training script should (gloo's threads torn down at exit,
    after the store's host has gone, end in std::terminate)."""
    import torch.distributed as dist

    dist.destroy_process_group()
    store = hd.get_store()
    store.add("test/finished", 1)
    deadline = time.monotonic() + 20
    while rank == 0 and store.add("test/finished", 0) < size and time.monotonic() < deadline:
        time.sleep(0.02)  # ok-sleep: polls the store's counter, with a deadline


if mode == "rendezvous":
    started = time.monotonic()
    try:
        hd.init_distributed("gloo", timeout=float(os.environ.get("INIT_TIMEOUT", "4")))
    except Exception as e:
        record(e, started)
        sys.exit(3)
    record(None, started)
    sys.exit(0)

_, size = hd.init_distributed("gloo", timeout=20)
started = time.monotonic()
if mode == "barrier_skip":
    if rank == size - 1:
        record(None, started, skipped=True)
    else:
        try:
            hd.barrier(timeout=3)
            record(None, started)
        except hd.BarrierTimeout as e:
            record(e, started)
    finish(size)
elif mode == "peer_failed":
    flag = hd.ErrorFlag(timeout=60)
    try:
        for step in range(10):
            with flag.guard(step):
                if rank == 1 and step == 3:
                    raise ValueError("boom on rank 1 at step 3")
        record(None, started, steps=10)
    except Exception as e:
        record(e, started, step=step)
    finish(size)
elif mode == "uneven":
    try:
        counts = hd.check_even_batches(5 + rank % 2, timeout=20)
        record(None, started, counts=counts)
    except hd.UnevenBatches as e:
        record(e, started)
    finish(size)
elif mode == "happy":
    for _ in range(3):
        hd.barrier(timeout=20)
    flag = hd.ErrorFlag(timeout=20)
    for step in range(5):
        with flag.guard(step):
            pass
    counts = hd.check_even_batches(5, timeout=20)
    import torch.distributed as dist

    pair = dist.new_group([0, 1])  # collective: every rank calls it
    extra = {}
    if rank in (0, 1):
        hd.barrier(group=pair, timeout=20)
        pair_flag = hd.ErrorFlag(group=pair, timeout=20)
        pair_flag.check(None)
        extra["pair_counts"] = hd.check_even_batches(rank, group=pair, action="warn")
    record(None, started, counts=counts, checks=flag.checks, **extra)
    finish(size)
