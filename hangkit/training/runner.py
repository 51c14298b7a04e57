"""The step runner: a training loop that reports every phase, survives failed epochs, and
cleans up on success, failure and interrupt.

    runner = StepRunner(train_step, loader, epochs=3, cleanup=[tracker.finish, destroy_pg])
    runner.run(steps=10)   # a notebook cell: ten steps, then back to the caller
    runner.run()           # to the end
    runner.close()         # or use it as a context manager

`train_step(batch, phase)` does one step; it calls `phase("forward")`, `phase("backward")`,
... as it goes, and each phase is reported through hangkit.progress(), so the monitor knows
where a rank stopped. Fetching the batch is the "data" phase; the runner reports "log" after
the step. Whatever the step returns (a dict of metrics) goes to `on_metrics`.

With `error_flag` (an ErrorFlag; distributed training), every step starts with the flag's
check once the batch is fetched (or failed to be): a rank whose data phase failed tells the
others, and all ranks end that epoch together. Failures inside the step after its first
collective are not covered: the process group's timeout and the monitor are.

Failures are handled per epoch: an exception ends that epoch (logged with its traceback),
and the next epoch starts; after `max_failures` failed epochs in a row the runner raises
TrainingFailed. KeyboardInterrupt is never swallowed, but cleanup still runs.
"""

from __future__ import annotations

import logging
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from hangkit.agent import progress
from hangkit.errors import HangkitError

log = logging.getLogger(__name__)

PHASES = ("data", "forward", "backward", "sync", "optimizer", "log")
HISTORY = 2000  # steps of timings kept


class TrainingFailed(HangkitError, RuntimeError):
    """Too many failed epochs in a row; carries each failure's traceback text."""

    def __init__(self, message: str, *, failures: list[str]):
        super().__init__(message, hint="the tracebacks of the failed epochs are in .failures "
                         "and in the log")
        self.failures = failures


@dataclass
class RunState:
    epoch: int = 0  # the epoch under way (0-based)
    step: int = 0  # steps done in all, across epochs
    epoch_step: int = 0  # steps done in the current epoch
    failed_epochs: list[str] = field(default_factory=list)  # tracebacks, in order
    consecutive_failures: int = 0
    finished: bool = False
    last_metrics: dict = field(default_factory=dict)
    # The latest steps' timings, oldest first, for plots: {"step", "epoch", "start" (time.time()),
    # "phases": {phase: seconds}}; a step's time is the sum of its phases.
    history: deque = field(default_factory=lambda: deque(maxlen=HISTORY))


class StepRunner:
    def __init__(self, train_step: Callable, loader: Iterable, *, epochs: int = 1,
                 max_failures: int = 3, log_interval: float = 30.0,
                 on_metrics: Callable[[int, dict], None] | None = None,
                 on_epoch_start: Callable[[int], None] | None = None,
                 cleanup: Iterable[Callable[[], object]] = (), error_flag=None,
                 clock=time.monotonic):
        if epochs < 1:
            raise HangkitError(f"epochs must be at least 1, got {epochs}")
        if max_failures < 1:
            raise HangkitError(f"max_failures must be at least 1, got {max_failures}")
        self.train_step, self.loader, self.epochs = train_step, loader, epochs
        self.max_failures, self.log_interval = max_failures, log_interval
        self.on_metrics, self.on_epoch_start = on_metrics, on_epoch_start
        self.cleanup_steps = list(cleanup)
        self.error_flag = error_flag
        self.clock = clock
        self.state = RunState()
        self._iterator = None
        self._last_log = clock()
        self._closed = False

    def __enter__(self) -> StepRunner:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def run(self, steps: int | None = None) -> RunState:
        """Runs `steps` more steps (None: to the end) and returns the state. Cleans up when the
        run ends, fails, or is interrupted; a partial run leaves everything open for the next
        call (a notebook's next cell)."""
        if self._closed:
            raise HangkitError("this runner is closed; make a new one to train again")
        done = 0
        try:
            while not self.state.finished and (steps is None or done < steps):
                if self._one_step():
                    done += 1
        except BaseException:
            self.close()
            raise
        if self.state.finished:
            self.close()
        return self.state

    def _one_step(self) -> bool:
        """One step, or the end of an epoch. True when a step was done."""
        s = self.state
        if self._iterator is None:
            if self.on_epoch_start is not None:
                self.on_epoch_start(s.epoch)
            self._iterator = iter(self.loader)
            s.epoch_step = 0
        self._timing = {"step": s.step, "epoch": s.epoch, "start": time.time(), "phases": {}}
        self._mark = ("data", time.perf_counter())
        try:
            progress(step=s.step, phase="data", epoch=s.epoch)
            error = None
            try:
                batch = next(self._iterator)
            except StopIteration:
                self._end_epoch(failure=None)
                return False
            except Exception as e:  # a dead or stuck worker, a corrupt sample
                error = e
            if self.error_flag is not None:
                # The step boundary, before the step's collectives: a rank that failed in the
                # data phase tells the others here, and every rank ends the epoch at the same
                # step, instead of the others waiting for it inside DDP's all-reduce (TD-04).
                self._phase("sync")
                self.error_flag.check(error, step=s.step)  # PeerFailed on the other ranks
            if error is not None:
                raise error
            metrics = self.train_step(batch, self._phase)
            self._phase("log")
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception:
            self._end_epoch(failure=traceback.format_exc())
            return False
        s.step += 1
        s.epoch_step += 1
        if metrics:
            s.last_metrics = dict(metrics)
            if self.on_metrics is not None:
                self.on_metrics(s.step, s.last_metrics)
        self._phase(None)
        s.history.append(self._timing)
        self._maybe_log()
        return True

    def _phase(self, name: str | None) -> None:
        """Reports the phase `name` and closes the timing of the one before (None: the end)."""
        now = time.perf_counter()
        previous, since = self._mark
        phases = self._timing["phases"]
        phases[previous] = phases.get(previous, 0.0) + (now - since)
        self._mark = (name, now)
        if name is not None:
            progress(phase=name)

    def _end_epoch(self, *, failure: str | None) -> None:
        s = self.state
        self._iterator = None
        if failure is None:
            log.info("epoch %d done: %d steps", s.epoch, s.epoch_step)
            s.consecutive_failures = 0
        else:
            s.failed_epochs.append(failure)
            s.consecutive_failures += 1
            log.error("epoch %d failed at its step %d (%d in a row):\n%s", s.epoch,
                      s.epoch_step, s.consecutive_failures, failure.rstrip())
            if s.consecutive_failures >= self.max_failures:
                raise TrainingFailed(
                    f"{s.consecutive_failures} epochs failed in a row (the last: "
                    f"{failure.strip().splitlines()[-1]})", failures=list(s.failed_epochs))
        s.epoch += 1
        if s.epoch >= self.epochs:
            s.finished = True

    def _maybe_log(self) -> None:
        now = self.clock()
        if now - self._last_log >= self.log_interval:
            self._last_log = now
            metrics = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                for k, v in self.state.last_metrics.items())
            log.info("epoch %d, step %d (%d in this epoch)%s", self.state.epoch,
                     self.state.step, self.state.epoch_step, f": {metrics}" if metrics else "")

    def close(self) -> None:
        """Runs every cleanup step once (process group, loaders, tracker), each guarded: one
        that fails is logged and the others still run."""
        if self._closed:
            return
        self._closed = True
        self._iterator = None  # lets a DataLoader iterator shut its workers down
        for step in self.cleanup_steps:
            try:
                step()
            except Exception:
                log.exception("cleanup step %r failed", getattr(step, "__name__", step))
