"""dataloader: a small in-memory dataset through torch's DataLoader with 0, 1, 2 and 4 workers,
each try in a sub-child of its own with a deadline and DataLoader(timeout=...), reporting the
largest worker count that works and its time per batch.

Guards against the DataLoader hangs of the catalogue that depend on the machine, not the data:
workers that cannot hand batches back (TMPDIR too long for their sockets: DL-06; out of file
descriptors: DL-07; /dev/shm full: DL-03), workers killed for memory (DL-02) and workers stuck
at start (fork-time locks and thread pools: DL-04/DL-05). Each try runs in its own sub-child, so a
hang costs one try's deadline and is killed with it; DataLoader(timeout=...) turns a worker that
never delivers into torch's own error, which says what the user would have seen.

To stay within ~20 s on a small node the tries run one after another with the fork start method
(cheap: workers inherit the imported torch) for every worker count, and with spawn (each worker
imports torch again, seconds each) only for the largest count, which tells whether
multiprocessing_context='spawn' is a way out when fork fails. Once a fork try hangs (rather than
fails), larger fork counts are not tried: the hangs above do not depend on the worker count, and
their time is better spent on the spawn try. Each try may use the time left but what the later
tries need to start. Fork tries wait for a batch HANGKIT_DOCTOR_DATALOADER_TIMEOUT; the spawn try
waits as long as its deadline allows, since its workers import torch before their first batch.
The dataset is TensorDataset, which spawned workers can unpickle (a class defined in a notebook
or `python -c` could not: WJ-06).

The result's data: `tries`, one dict per try in order, each with every key of TRY_KEYS
(method, workers; ok: True, False, or None when not tried; hung: whether it waited past its
DataLoader timeout or deadline; seconds, timeout, error, cause, and the timings of a try that
ran, None where they do not apply); `largest_working`, `per_batch_seconds`, `spawn_ok`.

HANGKIT_DOCTOR_WORKERS: comma-separated worker counts to try (default 0,1,2,4).
HANGKIT_DOCTOR_DATALOADER_TIMEOUT: DataLoader(timeout=...) per try, seconds (default 10; less
when the probe's deadline leaves less).
"""

from __future__ import annotations

import importlib.util

from hangkit.probes.api import (
    Outcome,
    ProbeContext,
    fail,
    ok,
    run_python,
    skipped,
    warn,
)

WORKERS = (0, 1, 2, 4)
TRY_TIMEOUT = 10.0
SAMPLES, FEATURES, BATCH = 128, 256, 8
MARKER = "HANGKIT-DATALOADER "
MARGIN = 1.0  # seconds kept back from the probe's deadline to report
MIN_TRY = 2.0  # a try with less time than this is not started
SPAWN_WEIGHT = 2.0  # a spawn try needs this many times MIN_TRY: its workers import torch
CHILD_MARGIN = 1.0  # seconds a sub-child keeps back from its own deadline to report
TRY_KEYS = ("method", "workers", "ok", "hung", "seconds", "timeout", "error", "cause",
            "import_seconds", "batches", "first_batch_seconds", "per_batch_seconds")

# The sub-child: one DataLoader pass with the given workers and start method, checked for every
# sample; reports, then kills any worker left (a hung one) rather than wait for it at exit.
CHILD = r"""
import json, multiprocessing, os, sys, time
started = time.monotonic()
workers, method = int(sys.argv[1]), sys.argv[2]
budget, try_timeout = float(sys.argv[3]), float(sys.argv[4])
samples, features, batch = int(sys.argv[5]), int(sys.argv[6]), int(sys.argv[7])
import torch
from torch.utils.data import DataLoader, TensorDataset
imported = time.monotonic() - started
result = {"import_seconds": round(imported, 3)}
timeout = min(try_timeout, budget - imported - __CHILD_MARGIN__)
dataset = TensorDataset(torch.randn(samples, features), torch.arange(samples))
options = {"batch_size": batch, "num_workers": workers}
if workers:
    options.update(timeout=round(max(timeout, 0.1), 1), multiprocessing_context=method)
    result["timeout"] = options["timeout"]
if workers and timeout < 0.1:
    result.update(ok=False, error=f"no time left after importing torch ({imported:.1f} s)")
else:
    t0 = time.monotonic()
    first = None
    seen = []
    try:
        for features_, labels in DataLoader(dataset, **options):
            if first is None:
                first = time.monotonic() - t0
            seen += labels.tolist()
        seconds = time.monotonic() - t0
        right = sorted(seen) == list(range(samples))
        batches = -(-samples // batch)
        result.update(ok=right, seconds=round(seconds, 3), batches=batches,
                      first_batch_seconds=round(first, 4),
                      per_batch_seconds=round((seconds - first) / max(batches - 1, 1), 5),
                      error=None if right else "the samples came back wrong")
    except Exception as e:
        message = str(e).strip().splitlines()[0] if str(e).strip() else ""
        result.update(ok=False, seconds=round(time.monotonic() - t0, 3),
                      hung="timed out after" in message,
                      error=f"{type(e).__name__}: {message}"[:300])
print("\n" + __MARKER__ + json.dumps(result), flush=True)  # first: cleaning up may be killed
for child in multiprocessing.active_children():
    child.kill()
    child.join(1.0)
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)
""".replace("__MARKER__", repr(MARKER)).replace("__CHILD_MARGIN__", repr(CHILD_MARGIN))

# Error lines worth quoting from a sub-child's stderr (its workers' tracebacks).


def run(ctx: ProbeContext) -> Outcome:
    if importlib.util.find_spec("torch") is None:
        return skipped("torch is not installed")
    try:
        counts = _counts(ctx.environ.get("HANGKIT_DOCTOR_WORKERS"))
        try_timeout = float(ctx.environ.get("HANGKIT_DOCTOR_DATALOADER_TIMEOUT") or TRY_TIMEOUT)
        if not try_timeout > 0:
            raise ValueError
    except ValueError:
        return fail("HANGKIT_DOCTOR_WORKERS or HANGKIT_DOCTOR_DATALOADER_TIMEOUT is not valid: "
                    f"{ctx.environ.get('HANGKIT_DOCTOR_WORKERS')!r}, "
                    f"{ctx.environ.get('HANGKIT_DOCTOR_DATALOADER_TIMEOUT')!r}",
                    "Set HANGKIT_DOCTOR_WORKERS to worker counts (e.g. 0,1,2,4) and "
                    "HANGKIT_DOCTOR_DATALOADER_TIMEOUT to a positive number of seconds.")
    plan = [("fork", n) for n in counts]
    if max(counts) > 0:
        plan.append(("spawn", max(counts)))
    tries, hung = [], None
    for i, (method, workers) in enumerate(plan):
        if method == "fork" and hung is not None:
            tries.append(record(method, workers, ok=None,
                                error=f"not tried: fork with {hung} workers hung already"))
            continue
        # Each try may use all the time left but what the later ones need to start at all:
        # a try that works is done in seconds, one that hangs stops at its DataLoader timeout.
        later = sum(SPAWN_WEIGHT if m == "spawn" else 1.0 for m, _ in plan[i + 1:])
        share = ctx.remaining(MARGIN) - MIN_TRY * later
        if share < MIN_TRY:
            tries.append(record(method, workers, ok=None, error="not tried: no time left"))
            continue
        # Spawned workers import torch before their first batch: they get all the time left.
        limit = share if method == "spawn" else try_timeout
        child = run_python(CHILD, timeout=share, env=ctx.environ,
                           args=[str(workers), method, f"{share - CHILD_MARGIN:.3f}",
                                 f"{limit:.3f}", str(SAMPLES), str(FEATURES), str(BATCH)])
        tries.append(record(method, workers, **child.tried(MARKER, share)))
        if workers and tries[-1].get("hung"):
            hung = workers
    return summarise(tries)


def record(method: str, workers: int, **found) -> dict:
    """One try with every key of TRY_KEYS: a child that ran out of time after importing torch,
    or was killed before it could report, says less than one that finished."""
    found.setdefault("hung", False)
    return {**dict.fromkeys(TRY_KEYS), **found, "method": method, "workers": workers}


def _counts(text: str | None) -> list[int]:
    if not text or not text.strip():
        return list(WORKERS)
    counts = sorted({int(x) for x in text.split(",") if x.strip()})
    if not counts or counts[0] < 0:
        raise ValueError(text)
    return counts


def _label(t: dict) -> str:
    return f"{t['method']} {t['workers']}" if t["workers"] else "0 workers"


def _why(t: dict, limit: int = 160) -> str:
    def short(text: str) -> str:
        return text if len(text) <= limit else text[:limit - 3] + "..."

    return f"{short(t['error'])} ({short(t['cause'])})" if t.get("cause") else short(t["error"])


def summarise(tries: list[dict]) -> Outcome:
    """The outcome of the tries (dicts with method, workers, ok, error, cause, timings); a pure
    function of them."""
    fork = [t for t in tries if t["method"] == "fork"]
    spawn = [t for t in tries if t["method"] == "spawn"]
    working = [t["workers"] for t in fork if t["ok"]]
    failed = [t for t in tries if t["ok"] is False]
    untried = [t for t in tries if t["ok"] is None]
    best = max(working) if working else None
    best_try = next((t for t in fork if t["ok"] and t["workers"] == best), None)
    data = {"tries": tries, "largest_working": best,
            "per_batch_seconds": best_try.get("per_batch_seconds") if best_try else None,
            "spawn_ok": spawn[0]["ok"] if spawn else None}
    parts = [f"{_label(t)}: " + (f"ok, {1000 * t['per_batch_seconds']:.2f} ms/batch"
                                 if t["ok"] else "FAILED" if t["ok"] is False else "not tried")
             for t in tries]
    summary = "; ".join(parts)
    zero = next((t for t in fork if t["workers"] == 0), None)
    if zero is not None and zero["ok"] is False:
        return fail(f"even num_workers=0 fails: {_why(zero)} ({summary})",
                    "The DataLoader fails without any worker process, so the cause is torch or "
                    "this process itself: check that `python -c 'import torch'` works here (see "
                    "the imports probe) and the error above. " + _advice(failed), **data)
    if not failed and not untried:
        return ok(f"up to {best} workers work: {summary}", **data)
    if not working:
        worst_try = failed[0] if failed else untried[0]
        return fail(f"no worker count works: {_label(worst_try)}: {_why(worst_try)} "
                    f"({summary})", _advice(failed), **data)
    if not failed:  # only untried ones: the deadline was too short to tell
        return warn(f"up to {best} workers work, the rest was not tried in time: {summary}",
                    "Give the probe more time: hangkit doctor --only dataloader --timeout 60.",
                    **data)
    first = failed[0]
    fork_failed = [t["workers"] for t in fork if t["ok"] is False]
    spawn_works = bool(spawn) and spawn[0]["ok"]
    if fork_failed:
        head = (f"num_workers={min(fork_failed)} fails ({_why(first)}); "
                f"num_workers={best} works")
        advice = f"Use DataLoader(num_workers={best}) until the cause is fixed. "
        if spawn_works:
            advice += (f"With multiprocessing_context='spawn', {spawn[0]['workers']} workers "
                       "work here: DataLoader(..., multiprocessing_context='spawn') is the "
                       "other way out. ")
    else:  # only spawn failed
        head = f"spawn with {spawn[0]['workers']} workers fails ({_why(spawn[0])})"
        advice = ("Keep the fork start method (the default; do not pass "
                  "multiprocessing_context='spawn') until the cause is fixed. ")
    return warn(f"{head}: {summary}", advice + _advice(failed), **data)


def _advice(failed: list[dict]) -> str:
    """Advice for the causes the failed tries' errors name, catalogue ids included."""
    text = " ".join(f"{t.get('error') or ''} {t.get('cause') or ''}" for t in failed)
    parts = []
    if "AF_UNIX path too long" in text or "torch_shm_manager" in text:
        parts.append("DL-06: TMPDIR is too long for the workers' sockets: export TMPDIR=/tmp "
                     "(or a short per-job directory) before training, or run it under "
                     "`hangkit watch`, which does so.")
    if "Too many open files" in text or "ancdata" in text or "Errno 24" in text:
        parts.append("DL-07: out of file descriptors: raise the limit in the job script "
                     "(ulimit -n $(ulimit -Hn)) or call "
                     "torch.multiprocessing.set_sharing_strategy('file_system') at the start "
                     "of training.")
    if ("No space left" in text or "Bus error" in text or "bus error" in text
            or "insufficient shared memory" in text):
        parts.append("DL-03: /dev/shm is short: check `df -h /dev/shm`, use fewer workers or a "
                     "smaller prefetch_factor.")
    if "killed by signal" in text:
        parts.append("DL-02: a worker was killed (out of memory?): use fewer workers or a "
                     "smaller prefetch_factor, and check the job's memory limit.")
    if ("failed to map segment" in text or "MemoryError" in text or "bad_alloc" in text
            or "Cannot allocate memory" in text):
        parts.append("Out of memory before any batch: the process's memory limit (ulimit -v, "
                     "or the job's memory request) is too small to load torch; raise it.")
    if "Can't get attribute" in text or "Can't pickle" in text:
        parts.append("WJ-06: spawned workers cannot find a class or function defined in "
                     "__main__ or a notebook: move it into an importable module.")
    if ("timed out" in text or "did not finish" in text) and not parts:
        parts.append("A worker never delivered a batch: with fork, a lock or thread pool held "
                     "at fork time (DL-04, DL-05: start threads later, OMP_NUM_THREADS=1, "
                     "cv2.setNumThreads(0), or multiprocessing_context='spawn'); run training "
                     "under `hangkit watch` to see the stuck worker's stack (DL-01).")
    return " ".join(parts) or "The error above is torch's own; run the failing DataLoader " \
                               "alone to see its whole traceback."
