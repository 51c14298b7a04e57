"""--inject for examples/train.py: the catalogue's hangs, produced on purpose at a rank and step.

    --inject KIND[:rank=R][:step=S]      (repeatable)

Each KIND (catalogue case): what happens on rank R, and what catches it.

- worker_stuck (DL-01): a DataLoader worker blocks forever on step S's batch. The batch
  deadline raises DataLoaderHang (worker, index, stack); the error flag ends that epoch on
  every rank; training goes on.
- worker_killed (DL-02): a DataLoader worker is SIGKILLed on step S's batch.
  DataLoaderWorkerDied names the worker and the signal; then as above.
- exception (TD-04): fetching step S's batch raises (a corrupt sample). The error flag: every
  rank ends the epoch at the same step; training goes on.
- skip_collective (TD-01): rank R skips the barrier at the end of step S's epoch. The
  barrier's deadline: the others name rank R as missing and stop.
- uneven_batches (TD-06): rank R gets one batch fewer. check_even_batches, before the first
  step, on every rank.
- tracker_hang (WJ-01; default rank 0, where wandb runs): wandb's server accepts and never
  answers. init_wandb's deadline, then offline mode.
- long_tmpdir (DL-06): rank R starts with a TMPDIR too long for AF_UNIX sockets.
  setup_environment() replaces it, and logs it.

Only what cannot be produced for real is staged: the "server that never answers" is a local
socket, and the corrupt sample is a raise. Each injection fires once.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from hangkit.errors import UsageError

KINDS = {"worker_stuck", "worker_killed", "exception", "skip_collective", "uneven_batches",
         "tracker_hang", "long_tmpdir"}
IN_WORKER = {"worker_stuck", "worker_killed", "exception"}  # fire in the dataset's __getitem__
DEFAULT_RANK = {"tracker_hang": 0}  # wandb runs on rank 0 only


@dataclass(frozen=True)
class Injection:
    kind: str
    rank: int
    step: int

    def __str__(self) -> str:
        return f"{self.kind} on rank {self.rank} at step {self.step}"


def parse_spec(spec: str) -> Injection:
    """'worker_stuck:rank=1:step=3' -> Injection; a bad spec raises UsageError naming it."""
    kind, *options = spec.split(":")
    if kind not in KINDS:
        raise UsageError(f"--inject {spec!r}: unknown kind {kind!r}; one of "
                         f"{', '.join(sorted(KINDS))}")
    values = {"rank": DEFAULT_RANK.get(kind, 1), "step": 1}
    for option in options:
        name, _, value = option.partition("=")
        if name not in values or not value.isdigit():
            raise UsageError(f"--inject {spec!r}: {option!r} is not rank=N or step=N "
                             "(N a whole number >= 0)")
        values[name] = int(value)
    return Injection(kind, values["rank"], values["step"])


def before_setup(injections, rank: int) -> None:
    """Process-level injections, made before setup_environment() and init_wandb()."""
    for inj in mine(injections, rank):
        if inj.kind == "long_tmpdir":
            # 100+ characters: a socket path under it exceeds sun_path's 108 bytes.
            top = tempfile.mkdtemp(prefix="hangkit-inject-")
            atexit.register(shutil.rmtree, top, ignore_errors=True)
            deep = Path(top, "x" * 90)
            deep.mkdir()
            os.environ["TMPDIR"] = str(deep)
        elif inj.kind == "tracker_hang":
            os.environ.update({"WANDB_BASE_URL": _silent_server(), "WANDB_API_KEY": "k" * 40,
                               "WANDB_SILENT": "true"})
            os.environ.pop("WANDB_MODE", None)


def mine(injections, rank: int) -> list[Injection]:
    return [i for i in injections if i.rank == rank]


def _silent_server() -> str:
    """A socket that accepts and never answers: a W&B server behind a dead network path."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    held = []

    def accept() -> None:  # holds connections open until the process exits (daemon thread)
        while True:
            held.append(sock.accept()[0])

    threading.Thread(target=accept, daemon=True, name="inject-silent-server").start()
    return f"http://127.0.0.1:{sock.getsockname()[1]}"


class InjectingDataset:
    """Wraps a dataset; on the armed epoch, fetching `index` makes a worker stick, die or raise.

    The step's first sample index is computed from the sampler for that epoch, and the
    injection is armed only when that epoch starts (every index comes up once an epoch), so it
    fires at the step asked for. A marker file makes it fire once, across worker processes."""

    def __init__(self, dataset, injection: Injection):
        self.dataset, self.injection = dataset, injection
        workdir = Path(tempfile.mkdtemp(prefix="hangkit-inject-"))
        atexit.register(shutil.rmtree, workdir, ignore_errors=True)  # workers never run atexit
        self.armed, self.fired = workdir / "armed", workdir / "fired"
        self.index: int | None = None

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index):
        if index == self.index and self.armed.exists() and not self.fired.exists():
            self.fired.touch()
            kind = self.injection.kind
            if kind == "worker_stuck":
                threading.Event().wait()  # blocks forever, as a worker stuck on a dead mount
            elif kind == "worker_killed":
                os.kill(os.getpid(), signal.SIGKILL)  # as the OOM killer does
            raise RuntimeError(f"injected: sample {index} on rank {self.injection.rank} is "
                               "corrupt")
        return self.dataset[index]

    def plan(self, sampler, steps_per_epoch: int, batch_size: int) -> int:
        """Finds the sample index of the injection's step; returns the epoch to arm."""
        epoch, within = divmod(self.injection.step, steps_per_epoch)
        saved = sampler.epoch
        sampler.set_epoch(epoch)
        self.index = list(sampler)[within * batch_size]
        sampler.set_epoch(saved)
        return epoch

    def arm(self) -> None:
        self.armed.touch()


class Shortened:
    """A sampler with the last `drop` indices left out: this rank gets fewer batches (TD-06)."""

    def __init__(self, sampler, drop: int):
        self.sampler, self.drop = sampler, drop

    def __iter__(self):
        return iter(list(self.sampler)[:len(self)])

    def __len__(self) -> int:
        return max(len(self.sampler) - self.drop, 0)

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

