"""torch_multiprocessing: a batch of tensors through a torch.multiprocessing queue to a child and
back, with the fork and spawn start methods and both sharing strategies (file_descriptor,
file_system): four combinations, each in a sub-child of its own with a deadline.

Guards against the hangs under DataLoader workers and mp.spawn: a tensor sent through a queue is
moved to shared memory and passed as a file descriptor over an AF_UNIX socket under TMPDIR
(file_descriptor, the Linux default) or by name through torch_shm_manager, whose socket is also
under TMPDIR (file_system). When that fails (socket path too long: DL-06; out of descriptors:
DL-07; /dev/shm full: DL-03) the sender's queue thread prints a traceback nobody reads, drops
the tensor, and the receiver waits forever. Each combination runs in its own sub-child (killed at
its deadline), all four at once, so the probe takes as long as the slowest one. The batch holds
TENSORS tensors, like a batch of several fields: file_descriptor needs a descriptor per tensor in
flight, which is what a low `ulimit -n` runs out of. The child's side, echo(), lives in this
module (which imports nothing heavy) so that spawned children can import it.

fork+file_descriptor is what training uses unless told otherwise: when it fails the probe fails
and names the combination that works; when another combination fails it warns.
"""

from __future__ import annotations

import importlib.util
from concurrent.futures import ThreadPoolExecutor

from hangkit.probes.api import (
    Outcome,
    ProbeContext,
    fail,
    ok,
    run_python,
    skipped,
    warn,
)

METHODS = ("fork", "spawn")
STRATEGIES = ("file_descriptor", "file_system")
DEFAULT = ("fork", "file_descriptor")  # Linux's defaults: what a DataLoader uses unless told
TENSORS = 16
MARKER = "HANGKIT-MP "
MARGIN = 1.0  # seconds kept back from the probe's deadline to kill sub-children and report
# Seconds a sub-child keeps back from its own deadline: to report, then stop its child.
CHILD_MARGIN = 1.5

# The sub-child: sends TENSORS tensors to a child of the given start method and waits for them
# to come back plus one, against its deadline; reports, then stops its child. The queues'
# threads are not waited for at exit: one stuck on a broken transfer must not hold the exit.
CHILD = r"""
import json, queue, sys, time
started = time.monotonic()
method, strategy, budget = sys.argv[1], sys.argv[2], float(sys.argv[3])
deadline = started + budget
import torch
import torch.multiprocessing as mp
from hangkit.probes.torch_multiprocessing import TENSORS, echo
mp.set_sharing_strategy(strategy)
ctx = mp.get_context(method)
to_child, from_child = ctx.Queue(), ctx.Queue()
sent = [torch.full((1024,), float(i)) for i in range(TENSORS)]
t0 = time.monotonic()
child = ctx.Process(target=echo, args=(strategy, to_child, from_child, budget), daemon=True)
child.start()
to_child.cancel_join_thread()
from_child.cancel_join_thread()
to_child.put(sent)
result = None
while result is None:
    try:
        back = from_child.get(timeout=0.1)
    except queue.Empty:
        if not child.is_alive():
            result = {"ok": False, "error": "the child exited with code "
                      f"{child.exitcode} without sending the tensors back"}
        elif time.monotonic() > deadline:
            result = {"ok": False, "hung": True, "error": "no tensors came back within "
                      f"{time.monotonic() - t0:.1f} s"}
        continue
    right = (isinstance(back, list) and len(back) == len(sent)
             and all(torch.equal(b, a + 1) for a, b in zip(sent, back)))
    result = {"ok": right, "error": None if right else "the tensors came back changed"}
result["seconds"] = round(time.monotonic() - t0, 3)
result["import_seconds"] = round(t0 - started, 3)
print("\n" + __MARKER__ + json.dumps(result), flush=True)  # first: cleaning up may be killed
to_child.put(None)  # the child may go: with file_descriptor it had to stay until we had them
child.join(timeout=1.0)
if child.is_alive():
    child.kill()
    child.join(1.0)
# file_system's segments outlive a killed child, and the torch_shm_manager that would remove
# them ends with this process: remove this try's own (named torch_<pid>_...), leaving /dev/shm
# as it was.
import glob, os
for pid in (os.getpid(), child.pid):
    for path in glob.glob(f"/dev/shm/torch_{pid}_*"):
        try:
            os.unlink(path)
        except OSError:
            pass
""".replace("__MARKER__", repr(MARKER))

# Error lines worth quoting from a sub-child's stderr (its queue threads' tracebacks).


def echo(strategy, to_child, from_child, budget):
    """The child's side, importable for spawn: the tensors back plus one, then wait for the
    parent's word before leaving (file_descriptor needs the sender alive while they are read)."""
    import torch.multiprocessing as mp

    mp.set_sharing_strategy(strategy)
    tensors = to_child.get(timeout=budget)
    from_child.put([t + 1 for t in tensors])
    to_child.get(timeout=budget)


def run(ctx: ProbeContext) -> Outcome:
    if importlib.util.find_spec("torch") is None:
        return skipped("torch is not installed")
    combos = [(m, s) for m in METHODS for s in STRATEGIES]
    budget = ctx.remaining(MARGIN)
    with ThreadPoolExecutor(max_workers=len(combos)) as pool:
        children = list(pool.map(
            lambda c: run_python(CHILD, timeout=budget, env=ctx.environ,
                                 args=[c[0], c[1], f"{max(budget - CHILD_MARGIN, 0.1):.3f}"]),
            combos))
    tries = {f"{m}+{s}": child.tried(MARKER, budget) for (m, s), child in zip(combos, children)}
    return summarise(tries)


def summarise(tries: dict[str, dict]) -> Outcome:
    """The outcome of the four tries, keyed "method+strategy"; a pure function of them."""
    default = "+".join(DEFAULT)
    working = [k for k, t in tries.items() if t["ok"]]
    broken = [k for k, t in tries.items() if not t["ok"]]
    lines = [f"{k} {t['seconds']:.1f} s" if t["ok"] else f"{k} FAILED ({_why(t)})"
             for k, t in tries.items()]
    detail = "; ".join(lines)
    data = {"tries": tries, "working": working}
    if not broken:
        return ok(detail, **data)
    advice = _advice(tries, working)
    if default in broken:
        return fail(f"{default} (training's default) does not work: {detail}", advice, **data)
    return warn(f"{', '.join(broken)} does not work: {detail}", advice, **data)


def _why(t: dict) -> str:
    return f"{t['error']}: {t['cause']}" if t.get("cause") else t["error"]


def _advice(tries: dict[str, dict], working: list[str]) -> str:
    causes = " ".join(str(t.get("cause") or "") + " " + str(t.get("error") or "")
                      for t in tries.values() if not t["ok"])
    parts = []
    if "AF_UNIX path too long" in causes or "torch_shm_manager" in causes:
        parts.append("TMPDIR is too long for the sockets under it (DL-06): export TMPDIR=/tmp "
                     "(or a short per-job directory) before training, or run it under "
                     "`hangkit watch`, which does so. Note file_system does not help here: "
                     "torch_shm_manager's socket is under TMPDIR too.")
    if ("Too many open files" in causes or "ancdata" in causes
            or "Errno 24" in causes):
        parts.append("Out of file descriptors (DL-07): raise the limit in the job script "
                     "(ulimit -n $(ulimit -Hn)) or, in training, "
                     "torch.multiprocessing.set_sharing_strategy('file_system').")
    if ("No space left" in causes or "Bus error" in causes
            or "insufficient shared memory" in causes):
        parts.append("Shared memory is short (DL-03): check `df -h /dev/shm`, free it, or use "
                     "fewer workers and a smaller prefetch_factor.")
    if "fork+file_system" in working and "fork+file_descriptor" not in working:
        parts.append("What works here: call torch.multiprocessing.set_sharing_strategy("
                     "'file_system') at the start of training, before any DataLoader.")
    elif "spawn+file_descriptor" in working and "fork+file_descriptor" not in working:
        parts.append("What works here: the spawn start method, "
                     "DataLoader(..., multiprocessing_context='spawn') and "
                     "torch.multiprocessing.spawn (fork-time locks, DL-04/DL-05).")
    elif "spawn+file_system" in working and "fork+file_descriptor" not in working:
        parts.append("What works here: spawn with file_system, "
                     "torch.multiprocessing.set_sharing_strategy('file_system') and "
                     "DataLoader(..., multiprocessing_context='spawn').")
    elif not working:
        parts.append("No combination works: tensors cannot be shared between processes here, "
                     "so use DataLoader(num_workers=0) until the cause above is fixed.")
    elif "fork+file_descriptor" in working:
        bad = [k for k in tries if not tries[k]["ok"]]
        parts.append(f"Training's default (fork+file_descriptor) works: avoid {', '.join(bad)} "
                     "(no set_sharing_strategy / multiprocessing_context changes) until the "
                     "cause above is fixed.")
    return " ".join(parts)
