"""tqdm: its write lock is free in a fresh process and after a fork, and progress bars are not
drawn on every rank.

Guards against WJ-05: tqdm serialises output through one lock shared across processes (a
multiprocessing RLock) and a thread lock; a process that forks while the lock is held (a bar
refreshing in the monitor thread, a worker that died holding it) leaves children whose every
bar update and tqdm.write blocks for good. And under mpiexec every rank draws its own bars into
one shared stderr: a flood of carriage-return lines that hides the output that matters.

What tqdm really reads is checked, not assumed: the bar's `disable` is taken from a bar made
in a sub-child with this environment. Since tqdm 4.66 every TQDM_* variable overrides the
default of the matching argument (tqdm.utils.envwrap); TQDM_DISABLE is converted with bool(),
so any non-empty value, "0" and "false" included, disables bars, and an explicit disable=
argument in the code wins over the variable.
"""

from __future__ import annotations

import importlib.util
import json

from hangkit.probes.api import Outcome, ProbeContext, fail, ok, run_python, skipped, timed_out, warn
from hangkit.rankenv import rank_from_environ, world_size_from_environ

LOCK_SECONDS = 5.0  # longest wait for one lock: a free lock is taken at once
_RESULT = "HANGKIT-TQDM-RESULT "

# The sub-child. TqdmDefaultWriteLock.acquire(timeout=) neither reports failure nor stops at
# the first lock that times out, so each underlying lock is tried on its own.
_CODE = f"""
import io, json, os, sys
import tqdm
timeout = float(sys.argv[1])
out = {{"version": tqdm.__version__}}
lock = tqdm.tqdm.get_lock()
locks = list(getattr(lock, "locks", [lock]))
out["mp_lock"] = getattr(type(lock), "mp_lock", None) is not None

def take_all():
    taken = []
    for lk in locks:
        if not lk.acquire(True, timeout):
            break
        taken.append(lk)
    for lk in reversed(taken):
        lk.release()
    return len(taken) == len(locks)

out["lock"] = take_all()
r, w = os.pipe()
pid = os.fork()
if pid == 0:
    os.close(r)
    os.write(w, b"1" if take_all() else b"0")
    os._exit(0)
os.close(w)
out["lock_after_fork"] = os.read(r, 1) == b"1"
os.waitpid(pid, 0)
# No monitor thread: the bar is only asked what it would do with this environment.
tqdm.tqdm.monitor_interval = 0
bar = tqdm.tqdm(total=1, file=io.StringIO())
out["disable"] = bool(bar.disable)
bar.close()
print({_RESULT!r} + json.dumps(out), flush=True)
"""

LOCK_ADVICE = (
    "WJ-05: a process that inherits tqdm's lock held, or shares it with a worker that died "
    "holding it, blocks in every bar update and tqdm.write. Start DataLoader workers and other "
    "processes before creating bars (or use the spawn/forkserver start method), do not draw "
    "bars or call tqdm.write in worker processes, and run `hangkit watch` to see which "
    "process waits in tqdm's lock.")
EVERY_RANK_ADVICE = (
    "WJ-05: create bars on rank 0 only, tqdm(..., disable=rank != 0), or export TQDM_DISABLE=1 "
    "on the other ranks (tqdm >= 4.66 reads it; any non-empty value disables, and an explicit "
    "disable= argument wins over it). Under a batch job stderr is a file, not a terminal: "
    "there log plain lines instead of bars, or slow bars down with TQDM_MININTERVAL=60 "
    "(mininterval=60).")


def run(ctx: ProbeContext) -> Outcome:
    if importlib.util.find_spec("tqdm") is None:
        return skipped("tqdm is not installed")
    lock_seconds = min(LOCK_SECONDS, max(ctx.remaining(1.0) / 3, 0.1))
    done = run_python(_CODE, timeout=max(ctx.remaining(), 0.1), env=dict(ctx.environ),
                      args=[str(lock_seconds)])
    found = [ln[len(_RESULT):] for ln in done.stdout.splitlines() if ln.startswith(_RESULT)]
    if done.timed_out:
        return timed_out("importing tqdm or taking its lock did not finish within the deadline",
                         LOCK_ADVICE)
    if done.returncode != 0 or not found:
        return fail(f"the tqdm check failed: {done.last_line() or done.returncode}",
                    "Run `python -c 'import tqdm; tqdm.tqdm(range(3))'` here to see why "
                    "tqdm does not work in this environment.")
    r = json.loads(found[0])
    data = {"tqdm_version": r["version"], "cross_process_lock": r["mp_lock"],
            "bars_disabled": r["disable"]}
    if not r["lock"]:
        return fail(f"tqdm's write lock was not free within {lock_seconds:g} s in a fresh "
                    "process", LOCK_ADVICE, **data)
    if not r["lock_after_fork"]:
        return fail(f"after a fork tqdm's write lock was not free within {lock_seconds:g} s",
                    LOCK_ADVICE, **data)
    rank = ctx.rank if ctx.rank is not None else rank_from_environ(ctx.environ)
    size = ctx.world_size or world_size_from_environ(ctx.environ)
    data.update(rank=rank, world_size=size)
    lock_note = ("lock free, also after fork" if r["mp_lock"] else
                 "thread lock free, also after fork; no cross-process lock (bars of forked "
                 "workers may interleave)")
    head = f"tqdm {r['version']}: {lock_note}"
    if r["disable"]:
        return ok(f"bars disabled here by the environment; {head}", **data)
    if size is None or size <= 1:
        return ok(f"one process; {head}", **data)
    if rank == 0:
        hint = "" if ctx.rank is not None else " (check the others with --ranks)"
        return ok(f"rank 0 of {size} draws bars{hint}; {head}", **data)
    where = f"rank {rank} of {size}" if rank is not None else f"a rank (unknown) of {size}"
    why = ("TQDM_DISABLE is set but this tqdm ignores it (needs >= 4.66)"
           if ctx.environ.get("TQDM_DISABLE") else "TQDM_DISABLE not set")
    return warn(f"bars made without disable= would be drawn on {where}, as on every rank "
                f"({why}); {head}",
                EVERY_RANK_ADVICE, **data)
