"""progress(): the one call training code makes.

The hot path is a few attribute writes on one object: no syscall, no lock, no clock read. The
sidecar thread notices changes when it next looks (every TICK seconds) and times them itself,
so a training loop pays well under a microsecond per call, monitored or not.
"""

from __future__ import annotations

import os


class ProgressState:
    """The latest progress of this process. Written by progress() and the collective wrappers,
    read by the sidecar. Races between them only ever cost a moment of staleness."""

    __slots__ = ("calls", "step", "phase", "fields", "collective", "collective_seconds",
                 "sequences", "error", "workers", "extra")

    def __init__(self):
        self.calls = 0
        self.step = None
        self.phase = None
        self.fields: dict = {}
        # (library, comm, op, seq, entered_at or None once returned), set by hangkit.instrument()
        self.collective: tuple | None = None
        self.collective_seconds = 0.0
        self.sequences: dict = {}
        self.error: str | None = None
        self.workers: list = []  # the safe DataLoader's WorkerStates
        # Structured state the user's own code publishes with the beats.
        self.extra: dict = {}


state = ProgressState()
# Whether the environment has been looked at for a monitor to report to (once per process).
_autostart_done = False


def progress(step=None, phase=None, **fields) -> None:
    """Records that this rank advanced: optionally its step, its phase, and any other fields.

    Safe to call from anywhere, as often as every few microseconds; never raises, never blocks.
    The first call starts the agent when $HANGKIT_MONITOR and $HANGKIT_MONITOR_KEY are set.
    """
    s = state
    s.calls += 1
    if step is not None:
        s.step = step
    if phase is not None:
        s.phase = phase
    if fields:
        s.fields.update(fields)
    if not _autostart_done:
        _autostart()


def publish(name: str, value) -> None:
    """Publishes structured state of your own with this rank's next beats (JSON-able: dicts,
    lists, numbers, strings); the monitor shows it as the rank's `extra`. Never raises."""
    state.extra[name] = value
    if not _autostart_done:
        _autostart()


def publish_workers(workers: list) -> None:
    """The rank's DataLoader workers (hangkit.records.WorkerState), sent with its next beats:
    the safe DataLoader calls this. Never raises."""
    state.workers = list(workers)
    if not _autostart_done:
        _autostart()


def skip_autostart() -> None:
    """The agent was started by hand (start_agent): progress() need not look for one."""
    global _autostart_done
    _autostart_done = True


def _autostart() -> None:
    global _autostart_done
    _autostart_done = True
    try:
        from hangkit.agent.sidecar import start_from_environ

        start_from_environ()
    except Exception:  # progress() must never raise, whatever the environment holds
        import logging

        logging.getLogger(__name__).debug("agent did not start", exc_info=True)


# A forked child (a DataLoader worker) is not the rank: it must not report as one.
os.register_at_fork(after_in_child=skip_autostart)
