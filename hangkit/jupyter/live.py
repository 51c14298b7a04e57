"""The dashboard of a running cluster, fed from the kernel's monitor by a background thread.

About once a second: stall detection (paced by the monitor), the ranks' statuses and events
into the Dashboard, the tracebacks of ranks whose task raised, and, on a new hang finding,
the engines' stacks merged with their diagnosis. The kernel itself never waits on this.
"""

from __future__ import annotations

import contextlib
import logging
import threading

from hangkit.jupyter.dashboard import Dashboard
from hangkit.jupyter.livestacks import look_at_engines, progressing
from hangkit.monitor.stall import HANG_KINDS
from hangkit.text import ranks_phrase

log = logging.getLogger(__name__)

# Findings that fill the stacks area on their own: a hang, a desync, a rank gone.
AUTO_CAPTURE = (*HANG_KINDS, "desync", "dead")


class LiveDashboard:
    def __init__(self, cluster, *, total_steps: int | None = None, interval: float = 1.0,
                 auto_capture: bool = True):
        self.cluster, self.interval, self.auto_capture = cluster, interval, auto_capture
        self.dashboard = Dashboard(total_steps, min_interval=interval,
                                   on_capture=cluster.stacks)
        self.followed: list = []  # RankTasks whose errors are shown
        self._shown: set[tuple[int, int]] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.ticks = 0

    def follow(self, tasks) -> None:
        self.followed = [*self.followed[-7:], tasks]

    def start(self) -> LiveDashboard:
        self.dashboard.show()
        self._thread = threading.Thread(target=self._run, daemon=True, name="hangkit-dashboard")
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5 * self.interval + 10)  # a capture may be under way

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.tick()
            except Exception:  # the dashboard must outlive a bad tick
                log.exception("dashboard update failed")

    def tick(self) -> None:
        """One update: what the background thread does every interval."""
        monitor = self.cluster.monitor
        if monitor is None:
            return
        new = monitor.detect()
        self.dashboard.update(monitor.statuses(), monitor.active_events())
        for tasks in self.followed:
            for rank, text in tasks.errors().items():
                if (id(tasks), rank) not in self._shown:
                    self._shown.add((id(tasks), rank))
                    self.dashboard.show_error(rank, text)
        hangs = [e for e in new if e.kind in AUTO_CAPTURE]
        if hangs and self.auto_capture:
            with contextlib.suppress(Exception):
                report = look_at_engines(self.cluster, why=f"[{hangs[0].kind}] "
                                                           f"{hangs[0].summary}")
                moving = progressing(report)
                note = f"captured on [{hangs[0].kind}] {hangs[0].summary}"
                if moving:  # as watch would: not a hang while a rank progresses
                    note += (f"; but {ranks_phrase(p.rank for p in moving)} "
                             f"{'is' if len(moving) == 1 else 'are'} progressing (busy)")
                self.dashboard.show_stacks(report.tree, report.diagnosis, note=note)
                self.dashboard.update(self.cluster.monitor.statuses(), ())
        self.dashboard.flush()
        self.ticks += 1

    def text(self) -> str:
        return self.dashboard.text()

    def _ipython_display_(self) -> None:
        self.dashboard.show()
