"""Every wait in hangkit has a deadline; this module is the one way to put one on a call.

A call that may block forever (an import from a hung filesystem, wandb.init on a dead
network, a test batch from a DataLoader, torch's TCPStore, an ipyparallel cluster that never
comes up) runs in a thread of its own, and the caller waits for it until its deadline, then
goes on. A Python thread cannot be stopped, so what is left behind is the thread: blocked
until its call returns, named "hangkit-deadline: NAME", and a daemon, so it never delays the
interpreter's exit. `abandoned()` lists those still alive, so a report can say so.

Not concurrent.futures: its worker threads are joined at interpreter exit, so one stuck call
would hang the exit of the very process that gave up on it.

    value = call(lambda: wandb.init(...), timeout=60, name="wandb init")
    pending = start(check_network, timeout=4, name="network check")   # runs meanwhile
    ...
    found = pending.result()                                           # at most until then
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from hangkit.errors import HangkitError

log = logging.getLogger(__name__)

T = TypeVar("T")
THREAD_PREFIX = "hangkit-deadline: "


class DeadlineExceeded(HangkitError, TimeoutError):
    """A call did not return within its deadline. `what` names it, `seconds` is its timeout.
    Subclasses (TrackerTimeout, ...) keep this signature, so `error=` can choose them."""

    def __init__(self, what: str, seconds: float, *, hint: str | None = None):
        super().__init__(f"{what} did not finish within {seconds:g} s", hint=hint)
        self.what = what
        self.seconds = seconds


@dataclass
class Abandoned:
    """A call given up on at its deadline whose thread was still running then."""

    name: str
    thread: threading.Thread
    since: float  # time.monotonic() at the deadline


_abandoned: list[Abandoned] = []
_abandoned_lock = threading.Lock()


def abandoned() -> list[Abandoned]:
    """The calls given up on whose threads are still running (stuck, most likely)."""
    with _abandoned_lock:
        _abandoned[:] = [a for a in _abandoned if a.thread.is_alive()]
        return list(_abandoned)


class Call(Generic[T]):
    """fn() running in a daemon thread since it was made, with a deadline `timeout` seconds
    later. done() and wait() never wait past the deadline; result() returns fn's value,
    raises what fn raised, or raises DeadlineExceeded."""

    def __init__(self, fn: Callable[[], T], *, timeout: float, name: str):
        self.name = name
        self.timeout = timeout
        self.started = time.monotonic()
        self.deadline = self.started + max(timeout, 0.0)
        self._fn = fn
        self._finished = threading.Event()
        self._value: Any = None
        self._error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name=THREAD_PREFIX + name,
                                       daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self._value = self._fn()
        except BaseException as e:  # handed to whoever asks for the result, whatever it is
            self._error = e
        finally:
            self._fn = None  # nothing of the call is kept alive by a thread left behind
            self._finished.set()

    def done(self) -> bool:
        return self._finished.is_set()

    def wait(self) -> bool:
        """Waits until the call returns or its deadline passes; True if it returned."""
        return self._finished.wait(max(self.deadline - time.monotonic(), 0.0))

    def result(self, *, on_timeout: Callable[[], Any] | None = None,
               error: type[DeadlineExceeded] = DeadlineExceeded) -> T:
        """fn's value, or what it raised. At the deadline: `on_timeout()` (to end what fn
        started: a service process, a socket; its failure is logged, not raised), then
        `error(name, timeout)` is raised and the thread is recorded as abandoned."""
        if not self.wait():
            with _abandoned_lock:
                _abandoned.append(Abandoned(self.name, self.thread, time.monotonic()))
            if on_timeout is not None:
                try:
                    on_timeout()
                except Exception as e:
                    log.warning("cleaning up after %s failed: %s: %s", self.name,
                                type(e).__name__, e)
            raise error(self.name, self.timeout)
        if self._error is not None:
            raise self._error
        return self._value


def start(fn: Callable[[], T], *, timeout: float, name: str) -> Call[T]:
    """Starts fn() now, to be asked for with .result() before its deadline is over."""
    return Call(fn, timeout=timeout, name=name)


def call(fn: Callable[[], T], *, timeout: float, name: str,
         on_timeout: Callable[[], Any] | None = None,
         error: type[DeadlineExceeded] = DeadlineExceeded) -> T:
    """fn() waited for at most `timeout` seconds: its value, what it raised, or `error`."""
    return start(fn, timeout=timeout, name=name).result(on_timeout=on_timeout, error=error)


def call_all(tasks: Mapping[str, tuple[Callable[[], Any], float]]) -> dict[str, Any]:
    """Runs every task at once, {name: (fn, timeout)}, and waits for each until its own
    deadline. Returns {name: its value, the exception it raised, or DeadlineExceeded}, so that
    one stuck task costs its own timeout and no more."""
    calls = {name: start(fn, timeout=timeout, name=name)
             for name, (fn, timeout) in tasks.items()}
    results: dict[str, Any] = {}
    for name, pending in calls.items():
        try:
            results[name] = pending.result()
        except Exception as e:
            results[name] = e
    return results
