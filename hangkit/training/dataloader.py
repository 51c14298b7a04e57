"""A hang-safe DataLoader: tested before use, a finite timeout on every batch, worker states
published with the rank's beats, and errors that say which worker hung or died, where.

Each worker writes its state into a small file-backed shared memory map (one slot of four
doubles per worker: pid, state, index, since), which works with fork and spawn and costs a few
stores per sample. The main process reads the slots, and each worker's exit code, when it
publishes (at most once a second, between batches) and when a batch fails.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import struct
import tempfile
import time

from hangkit import deadline
from hangkit.errors import HangkitError
from hangkit.records import WorkerPhase, WorkerState

log = logging.getLogger(__name__)

__all__ = ["DataLoaderHang", "DataLoaderWorkerDied", "SafeDataLoader", "safe_dataloader"]

_SLOT = struct.Struct("dddd")  # pid, state, index, since (wall clock)
_STARTING, _IDLE, _FETCHING = 0.0, 1.0, 2.0
_PHASES = {_STARTING: WorkerPhase.STARTING, _IDLE: WorkerPhase.IDLE,
           _FETCHING: WorkerPhase.FETCHING}
PUBLISH_EVERY = 1.0  # seconds between worker-state publications while batches flow
DUMP_TIMEOUT = 10.0  # seconds py-spy may take for a hung worker's stack


class DataLoaderHang(HangkitError, TimeoutError):
    """No batch within the timeout; names the rank, the worker, its index and its stack."""

    def __init__(self, message, *, rank=None, workers=(), hint=None):
        super().__init__(message, hint=hint)
        self.rank = rank
        self.workers = list(workers)


class DataLoaderWorkerDied(HangkitError, RuntimeError):
    """A worker exited or was killed (OOM killer, a batch scheduler's memory limit)."""

    def __init__(self, message, *, rank=None, workers=(), hint=None):
        super().__init__(message, hint=hint)
        self.rank = rank
        self.workers = list(workers)


# --- worker side -------------------------------------------------------------------------------

# In a worker process: (mmap, offset) of this worker's slot; None in the main process.
_worker_slot: tuple | None = None


def _map(path: str) -> mmap.mmap:
    with open(path, "r+b") as f:
        return mmap.mmap(f.fileno(), 0)


class _WorkerInit:
    """worker_init_fn that records the worker's pid in its slot, then runs the user's."""

    def __init__(self, path: str, user_fn):
        self.path = path
        self.user_fn = user_fn

    def __call__(self, worker_id: int):
        global _worker_slot
        m = _map(self.path)
        offset = worker_id * _SLOT.size
        _SLOT.pack_into(m, offset, os.getpid(), _IDLE, -1.0, time.time())
        _worker_slot = (m, offset)
        if self.user_fn is not None:
            self.user_fn(worker_id)


class _TrackedDataset:
    """Map-style dataset wrapper: records "fetching index i since t" around each __getitem__."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        slot = _worker_slot
        if slot is None:
            return self.dataset[index]
        m, offset = slot
        _SLOT.pack_into(m, offset, os.getpid(), _FETCHING,
                        float(index) if isinstance(index, int) else -1.0, time.time())
        item = self.dataset[index]
        m[offset + 8:offset + 16] = _IDLE_BYTES
        return item

    def __getattr__(self, name):  # attributes the user's collate_fn or sampler may read
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)


_IDLE_BYTES = struct.pack("d", _IDLE)


# --- main side ---------------------------------------------------------------------------------

def _rank():
    from hangkit.rankenv import rank_from_environ

    return rank_from_environ(dict(os.environ))


def _state_dir() -> str:
    shm = "/dev/shm"
    return shm if os.access(shm, os.W_OK) else tempfile.gettempdir()


def _remove_sigchld_pids(it) -> None:
    if getattr(it, "_worker_pids_set", False):
        from torch.utils.data import _utils

        _utils.signal_handling._remove_worker_pids(id(it))
        it._worker_pids_set = False


def _watch_deaths(it, on: bool) -> None:
    """Lets torch's SIGCHLD handler raise a worker's death only while this process waits in
    next(). Otherwise it raises wherever the main thread happens to be, say inside the
    error flag's all-reduce after this rank's share was sent, and the ranks fall out of step."""
    if on and not getattr(it, "_worker_pids_set", True):
        from torch.utils.data import _utils

        _utils.signal_handling._set_worker_pids(id(it), tuple(w.pid for w in it._workers))
        it._worker_pids_set = True
    elif not on:
        _remove_sigchld_pids(it)


def _dead_worker(it) -> str | None:
    """torch's own wording for a worker that died while its death was not watched."""
    dead = [w.pid for w in getattr(it, "_workers", []) if not w.is_alive()]
    if dead and not getattr(it, "_shutdown", False):
        return f"DataLoader worker (pid(s) {', '.join(map(str, dead))}) exited unexpectedly"
    return None


def _stop_workers(it, *, kill: bool) -> None:
    """Shuts the iterator's workers down now. Hung ones are killed first: torch's own shutdown
    waits 5 s for each before it terminates it."""
    if it is None or not hasattr(it, "_workers"):
        return
    if kill:
        _remove_sigchld_pids(it)  # so the kills below raise nothing in this thread
        for w in it._workers:
            with contextlib.suppress(Exception):
                if w.is_alive():
                    w.kill()
    with contextlib.suppress(Exception):
        it._shutdown_workers()
    for w in it._workers:
        with contextlib.suppress(Exception):
            w.join(timeout=5)


class _Slots:
    """The shared slots of one iteration's workers, and reading them into WorkerStates."""

    def __init__(self, num_workers: int):
        self.num_workers = num_workers
        fd, self.path = tempfile.mkstemp(prefix="hk-dl-", dir=_state_dir())
        with os.fdopen(fd, "wb") as f:
            f.write(b"\0" * max(_SLOT.size * num_workers, 1))
        self.map = _map(self.path)

    def close(self):
        with contextlib.suppress(Exception):
            self.map.close()
        with contextlib.suppress(OSError):
            os.unlink(self.path)

    def states(self, it, now: float | None = None) -> list[WorkerState]:
        now = time.time() if now is None else now
        procs = list(getattr(it, "_workers", []) or [])
        out = []
        for i in range(self.num_workers):
            pid, code, index, since = _SLOT.unpack_from(self.map, i * _SLOT.size)
            proc = procs[i] if i < len(procs) else None
            w = WorkerState(worker=i, pid=int(pid) or (proc.pid if proc is not None else None),
                            state=_PHASES.get(code, WorkerPhase.FETCHING))
            exitcode = None
            if proc is not None:
                with contextlib.suppress(Exception):
                    exitcode = proc.exitcode
            if exitcode is not None and exitcode < 0:
                w.state, w.signal = WorkerPhase.KILLED, -exitcode
            elif exitcode is not None:
                w.state, w.exit_code = WorkerPhase.EXITED, exitcode
            if code == _FETCHING:
                # For a dead worker this is what it was doing when it died.
                w.index = int(index) if index >= 0 else None
                w.since = since
                w.seconds = round(max(now - since, 0.0), 3)
            out.append(w)
        return out


def _stack_text(pid: int, timeout: float) -> str:
    if timeout <= 0:
        return "    (stack not captured: a test batch)"
    from hangkit import pyspy

    proc = pyspy.start_dump(pid, native=False)
    result = pyspy.finish_dump(proc, pid, timeout=timeout)
    if not result.threads:
        return f"    (no stack: {result.error})"
    lines = []
    for t in result.threads:
        lines.append(f"    thread {t.name or t.id}{' (main)' if t.is_main else ''}:")
        for f in t.frames[-12:]:
            lines.append(f'      File "{f.file}", line {f.line}, in {f.function}')
    return "\n".join(lines)


class SafeDataLoader:
    """Iterates like the DataLoader it wraps; see safe_dataloader()."""

    def __init__(self, loader, num_workers: int, *, stack_timeout: float = DUMP_TIMEOUT):
        self.loader = loader
        self.num_workers = num_workers
        self.stack_timeout = stack_timeout
        self.last_states: list[WorkerState] = []
        self._init_fn = loader.worker_init_fn

    def __len__(self):
        return len(self.loader)

    def __getattr__(self, name):
        if name == "loader":
            raise AttributeError(name)
        return getattr(self.loader, name)

    def _publish(self, slots, it) -> None:
        from hangkit.agent import publish_workers

        self.last_states = slots.states(it)
        publish_workers(self.last_states)

    def __iter__(self):
        if self.num_workers == 0:
            yield from self.loader
            return
        slots = _Slots(self.num_workers)
        if isinstance(self._init_fn, _WorkerInit):
            self.loader.worker_init_fn = _WorkerInit(slots.path, self._init_fn.user_fn)
        it = None
        failed = False
        try:
            it = iter(self.loader)
            _watch_deaths(it, False)
            self._publish(slots, it)
            next_publish = time.monotonic() + PUBLISH_EVERY
            while True:
                try:
                    died = _dead_worker(it)
                    if died is not None:
                        raise RuntimeError(died)
                    _watch_deaths(it, True)
                    try:
                        batch = next(it)
                    finally:
                        _watch_deaths(it, False)
                except StopIteration:
                    return
                except (RuntimeError, OSError, EOFError) as e:
                    # A dead worker shows as torch's RuntimeError, or as the broken queue to
                    # it (ConnectionResetError, EOFError), whichever the main process sees first.
                    failed = True
                    explained = self._explain(slots, it, e)
                    if explained is e:
                        raise
                    raise explained from e
                if time.monotonic() >= next_publish:
                    self._publish(slots, it)
                    next_publish = time.monotonic() + PUBLISH_EVERY
                yield batch
        finally:
            _stop_workers(it, kill=failed)
            with contextlib.suppress(Exception):
                self._publish(slots, it)
            slots.close()

    def _explain(self, slots, it, e: Exception) -> Exception:
        text = str(e)
        broken_queue = isinstance(e, OSError | EOFError)
        rank = _rank()
        who = f"rank {rank}" if rank is not None else f"pid {os.getpid()}"
        states = slots.states(it)
        self.last_states = states
        dead = [w for w in states if not w.state.alive]
        if "killed by signal" in text or "exited unexpectedly" in text or broken_queue or dead:
            if not dead:  # torch saw it first; the exit code may still be being reaped
                ends_at = time.monotonic() + 2.0
                while not dead and time.monotonic() < ends_at:
                    for w in getattr(it, "_workers", []):
                        # torch's SIGCHLD handler may raise this same death here.
                        with contextlib.suppress(RuntimeError):
                            w.join(timeout=0.05)
                    states = slots.states(it)
                    dead = [w for w in states if not w.state.alive]
            return DataLoaderWorkerDied(
                f"{who}: DataLoader " + "; ".join(w.describe() for w in dead or states),
                rank=rank, workers=dead or states,
                hint="a worker killed by signal 9 is usually out of memory: use fewer workers, "
                     "a smaller prefetch_factor or batch, or ask for more memory")
        if "timed out" in text:
            fetching = sorted((w for w in states if w.state == WorkerPhase.FETCHING
                               and w.since is not None), key=lambda w: w.since)
            suspects = fetching or [w for w in states if w.state in (WorkerPhase.STARTING,
                                                                     WorkerPhase.FETCHING)]
            lines = [f"{who}: DataLoader got no batch within {self.loader.timeout:g} s"]
            if not suspects:
                lines[0] += "; every worker is idle (lost batch: see DL-06/DL-07)"
            else:  # the first line is what other ranks are told (ErrorFlag, PeerFailed)
                lines[0] += ": " + "; ".join(w.describe() for w in suspects[:4])
            for w in suspects[:4]:
                lines.append(f"  worker {w.worker}'s stack (innermost last):")
                lines.append(_stack_text(w.pid, self.stack_timeout) if w.pid
                             else "    (no pid yet)")
            return DataLoaderHang(
                "\n".join(lines), rank=rank, workers=suspects or states,
                hint="fix the blocking call in the dataset, or raise timeout= if batches are "
                     "legitimately slow")
        return e


# --- building ----------------------------------------------------------------------------------

def _default_fallback(num_workers: int) -> tuple[int, ...]:
    counts = [num_workers]
    n = num_workers
    while n > 1:
        n //= 2
        counts.append(n)
    if counts[-1] != 0:
        counts.append(0)
    return tuple(counts)


def _build(dataset, num_workers, *, timeout, multiprocessing_context, worker_init_fn, kwargs,
           stack_timeout) -> SafeDataLoader:
    from torch.utils.data import DataLoader, IterableDataset

    if num_workers == 0:
        loader = DataLoader(dataset, num_workers=0, worker_init_fn=worker_init_fn, **kwargs)
        return SafeDataLoader(loader, 0, stack_timeout=stack_timeout)
    tracked = dataset if isinstance(dataset, IterableDataset) else _TrackedDataset(dataset)
    loader = DataLoader(
        tracked, num_workers=num_workers, timeout=timeout, persistent_workers=False,
        multiprocessing_context=multiprocessing_context,
        # The path is set per iteration by SafeDataLoader.__iter__.
        worker_init_fn=_WorkerInit("", worker_init_fn), **kwargs)
    return SafeDataLoader(loader, num_workers, stack_timeout=stack_timeout)


def _test_in_process(loader: SafeDataLoader, timeout: float) -> None:
    """One batch under a deadline: a dataset that hangs costs the deadline, not the caller (its
    thread is left behind, blocked; there is no way to stop it)."""
    try:
        deadline.call(lambda: next(iter(loader)), timeout=timeout, name="dataloader test batch")
    except deadline.DeadlineExceeded as e:
        raise DataLoaderHang(f"no batch from the dataset in this process within {timeout:g} s",
                             rank=_rank()) from e


def safe_dataloader(dataset, *, batch_size=1, num_workers: int = 4, fallback=None,
                    timeout: float = 60.0, test_timeout: float = 60.0,
                    multiprocessing_context=None, worker_init_fn=None,
                    stack_timeout: float = DUMP_TIMEOUT, **dataloader_kwargs) -> SafeDataLoader:
    """A DataLoader that has delivered one batch before it is returned.

    Tries num_workers, then each count of `fallback` (default: halving down to 0), each with a
    test batch under `test_timeout` seconds; returns a loader for the first count that works.
    Every batch of the returned loader has `timeout` seconds (> 0); a hung or dead worker
    raises DataLoaderHang or DataLoaderWorkerDied naming the worker, its index and its stack.
    persistent_workers is forced off, so no worker outlives an epoch.
    """
    if timeout <= 0 or test_timeout <= 0:
        raise ValueError("timeout and test_timeout must be > 0: every batch needs a deadline")
    dataloader_kwargs.pop("persistent_workers", None)
    dataloader_kwargs.pop("timeout", None)
    counts = list(fallback) if fallback is not None else list(_default_fallback(num_workers))
    if not counts or counts[0] != num_workers:
        counts.insert(0, num_workers)
    counts = list(dict.fromkeys(counts))  # no count twice
    kwargs = dict(batch_size=batch_size, **dataloader_kwargs)
    errors = []
    for n in counts:
        log.info("Trying DataLoader with %d workers...", n)
        test = _build(dataset, n, timeout=test_timeout,
                      multiprocessing_context=multiprocessing_context if n else None,
                      worker_init_fn=worker_init_fn, kwargs=kwargs, stack_timeout=0.0)
        started = time.monotonic()
        try:
            if n == 0:
                _test_in_process(test, test_timeout)
            else:
                batches = iter(test)
                try:
                    next(batches)
                finally:
                    batches.close()  # shuts the test workers down before anything else
        except Exception as e:
            lines = str(e).splitlines() or [type(e).__name__]
            reason = lines[0]
            if len(lines) > 1 and lines[1].strip().startswith("worker"):
                reason += "; " + lines[1].strip().split("; its stack")[0]
            log.warning("DataLoader test with %d workers failed: %s", n, reason)
            errors.append((n, e))
            continue
        log.info("DataLoader test successful with %d workers", n)
        log.debug("the test batch took %.2f s", time.monotonic() - started)
        return _build(dataset, n, timeout=timeout,
                      multiprocessing_context=multiprocessing_context if n else None,
                      worker_init_fn=worker_init_fn, kwargs=kwargs, stack_timeout=stack_timeout)
    n, last = errors[-1]
    raise DataLoaderHang(
        "no DataLoader configuration delivered a test batch: " + "; ".join(
            f"{n} workers: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
            for n, e in errors), rank=_rank(),
        hint="run `hangkit doctor --only dataloader`, and check the dataset itself") from last
