"""Experiment trackers that cannot hang training: a deadline around init, offline before retry.

Guards against WJ-01 (wandb.init on a compute node without network: "Network error
(ConnectTimeout), entering retry loop" for 90 s and more while the other ranks wait in their first
collective) and WJ-03 (the offline fallback after a failed online init times out too, because the
mode was not changed before the second try).

`guarded` runs an init under a deadline. A Python thread cannot be killed, so the init runs in a
daemon thread that is abandoned at the deadline. What "nothing left behind" means here:

- processes: the wandb service processes (wandb-core, wandb-symon) are children of this process;
  at a deadline they are killed, so nothing outside this process keeps running, and an init
  that was waiting on them usually returns (with an error nobody reads) once its socket closes.
- threads: an init stuck in a C call (name resolution, a read on a hung filesystem) cannot be
  stopped from Python. Its thread stays, blocked, until that call returns; it is a daemon, so it
  never delays the interpreter's exit, and `hangkit.deadline.abandoned()` lists it so a report
  can say so.
  Training goes on without it.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import queue
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

from hangkit import deadline
from hangkit.deadline import DeadlineExceeded
from hangkit.rankenv import rank_from_environ

log = logging.getLogger(__name__)

T = TypeVar("T")

OFFLINE_MODES = ("offline", "dryrun")
# Room for wandb's own init_timeout to fire (and clean up after itself) before the guard does.
_WANDB_OWN_TIMEOUT_SHARE = 0.8
_LOG_QUEUE_SIZE = 10_000
_SERVICE_PREFIX = "wandb-"  # wandb-core, wandb-symon: wandb's service binaries
MARKER_VARIABLE = "HANGKIT_TRACKER_ID"


class TrackerTimeout(DeadlineExceeded):
    """A tracker's init (or finish) did not return within its deadline."""

    def __init__(self, what: str, seconds: float, *, hint: str | None = None):
        super().__init__(
            what, seconds,
            hint=hint or "the call was abandoned in a daemon thread; training can go on "
                         "without it (for wandb: WANDB_MODE=offline on nodes without network)")


def guarded(fn: Callable[[], T], *, timeout: float, name: str,
            on_timeout: Callable[[], Any] | None = None) -> T:
    """fn() under a deadline (hangkit.deadline.call): its result, or what it raised; at the
    deadline `on_timeout()` (to kill what fn started: a service process, a socket), then
    TrackerTimeout naming `name`. See the module's docstring for what is left behind when fn
    is stuck in a C call."""
    return deadline.call(fn, timeout=timeout, name=name, on_timeout=on_timeout,
                         error=TrackerTimeout)


def kill_wandb_services() -> list[int]:
    """SIGKILL to wandb's service processes started from this process: its descendants named
    wandb-*, and those carrying this process's marker (wandb-symon outlives wandb-core and is
    then no descendant). Waits briefly for them; returns their pids."""
    try:
        import psutil

        from hangkit.procfs import read_environ
    except ImportError:  # psutil is a dependency of hangkit, but a tracker must never raise
        return []
    marker = os.environ.get(MARKER_VARIABLE)
    found = []
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error, OSError):
            if proc.pid == os.getpid() or not proc.name().startswith(_SERVICE_PREFIX):
                continue
            ours = marker is not None and (read_environ(proc.pid) or {}).get(
                MARKER_VARIABLE) == marker
            if ours or os.getpid() in {p.pid for p in proc.parents()}:
                proc.kill()
                found.append(proc)
    psutil.wait_procs(found, timeout=3)
    return [p.pid for p in found]


def _mark_this_process() -> None:
    """A marker every process started from here inherits (wandb's services included), so
    kill_wandb_services finds them even once they are no descendants of this process."""
    if os.environ.get(MARKER_VARIABLE, "").split(":")[0] != str(os.getpid()):
        os.environ[MARKER_VARIABLE] = f"{os.getpid()}:{uuid.uuid4().hex}"


class Tracker:
    """What init_wandb returns: `log(dict)` and `finish()` never raise and never hold training
    up for long. log() only queues (a full queue drops and counts); a thread of the tracker's
    own hands the queue to wandb, so a stuck wandb stalls that thread, not training."""

    def __init__(self, mode: str, *, run: Any = None, wandb: Any = None,
                 reason: str | None = None):
        self.mode = mode  # "online", "offline" or "disabled"
        self.run = run
        self.reason = reason  # why disabled or offline, for a report
        self.dropped = 0  # log() calls not delivered: queue full, or finished already
        self.failures = 0  # run.log calls that raised (swallowed)
        self.finished = False
        self._wandb = wandb
        self._queue: queue.Queue | None = None
        self._sender: threading.Thread | None = None
        if run is not None:
            self._queue = queue.Queue(maxsize=_LOG_QUEUE_SIZE)
            self._sender = threading.Thread(target=self._send, name="hangkit-tracker-log",
                                            daemon=True)
            self._sender.start()

    @property
    def enabled(self) -> bool:
        return self.run is not None

    def __repr__(self) -> str:
        return f"Tracker(mode={self.mode!r}, reason={self.reason!r})"

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.finish()

    def log(self, data: dict, **kwargs: Any) -> None:
        if self._queue is None:
            return
        if self.finished:
            self.dropped += 1
            return
        try:
            self._queue.put_nowait((dict(data), kwargs))
        except queue.Full:
            self.dropped += 1
        except Exception:
            self.failures += 1

    def _send(self) -> None:
        assert self._queue is not None
        while True:
            item = self._queue.get()
            if item is None:
                return
            data, kwargs = item
            try:
                self.run.log(data, **kwargs)
            except Exception as e:
                self.failures += 1
                if self.failures == 1:  # once: a broken tracker must not flood the log
                    log.warning("wandb: run.log failed (%s: %s); further failures are counted, "
                                "not logged", type(e).__name__, e)

    def finish(self, *, timeout: float = 30.0) -> None:
        """Sends what is queued, then run.finish(), all within `timeout` seconds; at the
        deadline the rest is abandoned and wandb's service processes are killed."""
        if self.finished or self.run is None:
            self.finished = True
            return
        self.finished = True
        ends_at = time.monotonic() + timeout
        assert self._queue is not None and self._sender is not None
        try:
            self._queue.put(None, timeout=max(ends_at - time.monotonic(), 0.0))
            self._sender.join(max(ends_at - time.monotonic(), 0.0))
            if self._sender.is_alive():
                raise TrackerTimeout("wandb: sending the logged values", timeout)
            guarded(self.run.finish, timeout=max(ends_at - time.monotonic(), 0.0),
                    name="wandb run.finish")
            if self.dropped or self.failures:
                log.warning("wandb: %d logged values dropped, %d failed", self.dropped,
                            self.failures)
            log.info("wandb: %s run finished", self.mode)
        except Exception as e:
            log.warning("wandb: finish did not complete (%s: %s); killing wandb's service "
                        "processes", type(e).__name__, e)
            kill_wandb_services()
        # Stops wandb's service now rather than at exit; it is ours alone (a child process).
        if self._wandb is not None:
            with contextlib.suppress(Exception):
                guarded(self._wandb.teardown, timeout=max(ends_at - time.monotonic(), 1.0),
                        name="wandb.teardown")
        # What teardown left (wandb-symon, once orphaned, lingers on its own for a while).
        kill_wandb_services()


def disabled(reason: str) -> Tracker:
    """A no-op tracker: log() and finish() do nothing."""
    return Tracker("disabled", reason=reason)


def init_wandb(*, project: str | None = None, timeout: float = 60.0, rank: int | None = None,
               all_ranks: bool = False, **wandb_init_kwargs: Any) -> Tracker:
    """wandb.init under a deadline, on rank 0 only unless all_ranks. Online first (unless
    WANDB_MODE or mode= says otherwise); on failure or timeout, offline is chosen (WANDB_MODE
    set for this process and its children) before the one retry; if that fails, a disabled
    tracker. Never raises, never blocks for much more than 2 x timeout (plus importing wandb,
    also under the deadline). Each decision is one log line."""
    if rank is None:
        rank = rank_from_environ(dict(os.environ))
    if rank not in (None, 0) and not all_ranks:
        return disabled(f"rank {rank}: only rank 0 tracks (all_ranks=True for every rank)")
    _mark_this_process()
    try:
        wandb = guarded(lambda: importlib.import_module("wandb"), timeout=timeout,
                        name="import wandb")
    except ImportError:
        log.warning("wandb is not installed: tracking disabled (pip install wandb)")
        return disabled("wandb is not installed")
    except TrackerTimeout as e:
        log.warning("%s (a slow or hung filesystem?); tracking disabled", e)
        return disabled(str(e))
    except Exception as e:
        log.warning("import wandb failed (%s: %s): tracking disabled", type(e).__name__, e)
        return disabled(f"import wandb failed: {type(e).__name__}: {e}")

    mode = (wandb_init_kwargs.pop("mode", None) or os.environ.get("WANDB_MODE") or "online")
    mode = mode.strip().lower()
    if mode == "disabled":
        log.info("wandb: mode is disabled: no tracking")
        return disabled("WANDB_MODE=disabled")
    settings = wandb_init_kwargs.pop("settings", None)
    if project is not None:
        wandb_init_kwargs["project"] = project

    if mode not in OFFLINE_MODES:
        own = max(timeout * _WANDB_OWN_TIMEOUT_SHARE, 0.1)
        started = time.monotonic()
        try:
            run = guarded(
                lambda: wandb.init(mode="online", settings=_settings(wandb, settings, own),
                                   **wandb_init_kwargs),
                timeout=timeout, name="wandb online init", on_timeout=_after_stuck_init(wandb))
            log.info("wandb: online run started in %.1f s", time.monotonic() - started)
            return Tracker("online", run=run, wandb=wandb)
        except TrackerTimeout:
            why, detail = f"wandb online init did not finish within {timeout:g} s", ""
        except Exception as e:
            text = " ".join(str(e).split())[:200]
            if "timed out" in text.lower():
                why = f"wandb online init did not finish within {timeout:g} s"
                detail = f" [wandb: {text}]"
            else:
                why, detail = f"wandb online init failed ({type(e).__name__}: {text})", ""
        # WJ-03: the mode changes before the retry, for this process and what it starts.
        os.environ["WANDB_MODE"] = "offline"
        _stop_wandb_telemetry()
        log.warning("%s; retrying offline with WANDB_MODE=offline (sync later with "
                    "`wandb sync <WANDB_DIR>/wandb/offline-run-*`)%s", why, detail)
    else:
        why = f"WANDB_MODE={mode}"

    started = time.monotonic()
    try:
        run = guarded(
            lambda: wandb.init(mode="offline", settings=_settings(wandb, settings, None),
                               **wandb_init_kwargs),
            timeout=timeout, name="wandb offline init", on_timeout=_after_stuck_init(wandb))
    except Exception as e:
        text = " ".join(str(e).split())[:200]
        log.warning("wandb offline init failed too (%s: %s); tracking disabled for this run",
                    type(e).__name__, text)
        return disabled(f"{why}; offline: {type(e).__name__}: {text}")
    sync_dir = os.path.dirname(str(getattr(run, "dir", "") or "")) or "<WANDB_DIR>/wandb"
    log.info("wandb: offline run started in %.1f s; sync it later with `wandb sync %s`",
             time.monotonic() - started, sync_dir)
    return Tracker("offline", run=run, wandb=wandb, reason=why)


def _settings(wandb: Any, given: Any, init_timeout: float | None) -> Any:
    """The caller's settings, with wandb's own init_timeout set inside our deadline."""
    if init_timeout is None:
        return given
    if given is None:
        return wandb.Settings(init_timeout=init_timeout)
    if isinstance(given, dict):
        return {**given, "init_timeout": init_timeout}
    with contextlib.suppress(Exception):
        given.init_timeout = init_timeout
    return given


def _after_stuck_init(wandb: Any) -> Callable[[], None]:
    def clean() -> None:
        killed = kill_wandb_services()
        if killed:
            log.info("wandb: killed its service processes %s after the deadline", killed)
        # Forget the dead service so the next init starts a fresh one.
        with contextlib.suppress(Exception):
            guarded(wandb.teardown, timeout=2.0, name="wandb.teardown")

    return clean


def _stop_wandb_telemetry() -> None:
    """wandb (0.31) starts OpenTelemetry exporters with an online init that flush to the server
    at exit, 10 s per request: with a server that does not answer, the process then takes 20 s
    and more to exit. Turned off once online has failed; best effort, as it is wandb's
    internals (a wandb without them is left as it is)."""
    try:
        from wandb.analytics.opentelemetry import opentelemetry_proxy as otel
    except Exception:
        return
    with contextlib.suppress(Exception):
        otel.disable()  # no new exporters in this process
    # The failed init made one of its own (wandb_init.py: OpenTelemetryProxy.from_settings),
    # reachable from nowhere but its atexit hook: found once, by type.
    import gc
    import warnings

    with warnings.catch_warnings():  # isinstance() on some objects warns (torch's reduce_op)
        warnings.simplefilter("ignore")
        proxies = [o for o in gc.get_objects() if isinstance(o, otel.OpenTelemetryProxy)]
    for proxy in proxies:
        # Marks it shut down at once (so its atexit hook returns at once), then flushes in a
        # daemon thread that is abandoned if the server does not answer.
        with contextlib.suppress(Exception):
            guarded(lambda p=proxy: p.shutdown(timeout_millis=500), timeout=0.5,
                    name="wandb telemetry shutdown")
