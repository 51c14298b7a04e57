"""The hang-safe environment for this process, and progress bars that cannot flood or block.

setup_environment applies hangkit.envsetup.hang_safe_environment (the same rules the launcher
wrappers use) to this process. progress_bar guards against WJ-05: every rank drawing a tqdm bar
floods the job's log, and tqdm's cross-process lock held by a dead child blocks tqdm.write; so
only rank 0 draws, and where the output is not a terminal (a batch job's log) it writes a plain
line every so often instead of carriage-return redraws.
"""

from __future__ import annotations

import logging
import multiprocessing.util
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, MutableMapping
from typing import IO, Any

from hangkit.envsetup import hang_safe_environment
from hangkit.rankenv import rank_from_environ

log = logging.getLogger(__name__)

DEFAULT_LOG_EVERY = 30.0  # seconds between plain progress lines


def setup_environment(environ: MutableMapping[str, str] = os.environ) -> list[str]:
    """Short TMPDIR (a new one under /tmp when AF_UNIX socket paths under the current one would
    be too long), PYTHONUNBUFFERED, OMP_NUM_THREADS when unset, WANDB_SILENT. Changes `environ`
    in place (and, for os.environ, tempfile.tempdir, so this process uses the new TMPDIR too);
    returns one line per change. A TMPDIR created here is removed when this process exits.

    PYTHONUNBUFFERED reaches only processes started afterwards; this one's streams are as they
    were (start Python with -u, or set it in the job script, for this process)."""
    new, changes, created = hang_safe_environment(dict(environ))
    for name, value in new.items():
        if environ.get(name) != value:
            environ[name] = value
    if created is not None:
        if environ is os.environ:
            tempfile.tempdir = created
        owner = os.getpid()

        def remove() -> None:
            if os.getpid() == owner:  # not in a forked child that runs atexit handlers
                shutil.rmtree(created, ignore_errors=True)

        # After multiprocessing's own exit-time cleanup (exitpriority -100), which removes its
        # pymp-* directories under this TMPDIR: a plain atexit hook might run before it.
        multiprocessing.util.Finalize(None, remove, exitpriority=-1000)
    for line in changes:
        log.info("environment: %s", line)
    return changes


class _PlainProgress:
    """Iterates and writes "desc: n/total (p%) r it/s" every `every` seconds and at the end;
    writes nothing when quiet (ranks other than 0)."""

    def __init__(self, iterable: Iterable, *, total: int | None, desc: str | None,
                 every: float, file: IO[str] | None, quiet: bool):
        self.iterable = iterable
        self.total = total
        self.desc = desc or "progress"
        self.every = every
        self.file = file
        self.quiet = quiet
        self.n = 0

    def __len__(self) -> int:
        if self.total is None:
            raise TypeError("progress over an iterable without a length")
        return self.total

    def __iter__(self) -> Iterator:
        started = last = time.monotonic()
        try:
            for item in self.iterable:
                yield item
                self.n += 1
                now = time.monotonic()
                if not self.quiet and now - last >= self.every:
                    last = now
                    self._line(now - started)
        finally:
            if not self.quiet:
                self._line(time.monotonic() - started, final=True)

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_postfix(self, *args: Any, **kwargs: Any) -> None:
        """Accepted for tqdm compatibility; plain lines do not show it."""

    def close(self) -> None:
        """Accepted for tqdm compatibility."""

    def _line(self, seconds: float, *, final: bool = False) -> None:
        of = f"/{self.total}" if self.total is not None else ""
        pct = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        rate = self.n / seconds if seconds > 0 else 0.0
        line = (f"{self.desc}: {self.n}{of}{pct} {rate:.3g} it/s {seconds:.0f} s"
                + (" done" if final else ""))
        out = self.file if self.file is not None else sys.stderr
        try:
            out.write(line + "\n")
            out.flush()
        except (OSError, ValueError):  # a closed or broken stream must not stop training
            pass


def progress_bar(iterable: Iterable, *, rank: int | None = None,
                 log_every: float = DEFAULT_LOG_EVERY, **tqdm_kwargs: Any) -> Any:
    """A tqdm bar over iterable on rank 0 (or without a launcher) when its output is a
    terminal; plain lines every `log_every` seconds when it is not (or tqdm is not installed);
    nothing at all on other ranks (a disabled tqdm, which never takes tqdm's lock)."""
    if rank is None:
        rank = rank_from_environ(dict(os.environ))
    file = tqdm_kwargs.get("file")
    total = tqdm_kwargs.get("total")
    if total is None:
        try:
            total = len(iterable)  # type: ignore[arg-type]
        except TypeError:
            total = None
    quiet = rank not in (None, 0) or bool(tqdm_kwargs.get("disable"))
    try:
        from tqdm.auto import tqdm
    except ImportError:
        tqdm = None
    if tqdm is not None and quiet:
        return tqdm(iterable, **{**tqdm_kwargs, "disable": True})
    # A notebook kernel's streams are no terminals, but tqdm.auto draws a widget there.
    in_kernel = "ipykernel" in sys.modules
    if tqdm is not None and (in_kernel or (_is_terminal(file) and _is_terminal(sys.stdout))):
        return tqdm(iterable, **tqdm_kwargs)
    return _PlainProgress(iterable, total=total, desc=tqdm_kwargs.get("desc"), every=log_every,
                          file=file, quiet=quiet)


def _is_terminal(stream: Any) -> bool:
    stream = stream if stream is not None else sys.stderr
    try:
        return bool(stream.isatty())
    except (AttributeError, OSError, ValueError):
        return False
