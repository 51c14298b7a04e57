"""Files hangkit writes and reads: written whole or not at all, private where they hold a
job's secrets, and read from their end where they may be gigabytes.

A reader (the doctor collecting a rank's result, a person opening a report while the job is
ended) must never see half a file, so every file is written beside its place and renamed onto
it (os.replace is atomic within a filesystem).
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

TAIL_LIMIT = 4 << 20  # bytes read at most from a file's end: tqdm bars make 4 MiB "lines"
_BLOCK = 64 << 10


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, *, mode: int | None = None) -> Iterator[BinaryIO]:
    """A binary file that appears at `path` only once the block ends without an error.
    `mode` (e.g. 0o600) is set exactly, whatever the umask; None: as the umask allows."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666 if mode is None else mode)
    try:
        if mode is not None:
            os.fchmod(fd, mode)  # os.open's mode is filtered by the umask
        with os.fdopen(fd, "wb") as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_atomic(path: str | os.PathLike, data: bytes | str, *,
                 mode: int | None = None) -> Path:
    """Writes data (text as UTF-8) to path, whole or not at all; see atomic_file."""
    with atomic_file(path, mode=mode) as f:
        f.write(data.encode() if isinstance(data, str) else data)
    return Path(path)


def private_directory(directory: str | os.PathLike) -> Path:
    """The directory, made 0700 if it is new (reports hold stacks and environments)."""
    directory = Path(directory)
    created = not directory.exists()
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    if created:
        os.chmod(directory, 0o700)  # mkdir's mode is filtered by the umask
    return directory


def tail_lines(path: str | os.PathLike, n: int, *,
               limit: int = TAIL_LIMIT) -> tuple[list[bytes], bool]:
    """The last n lines of a file, read from its end (job output can be gigabytes), and
    whether `limit` bytes cut them short (then the first one returned is a line's end)."""
    with open(path, "rb") as f:
        pos = f.seek(0, os.SEEK_END)
        data = b""
        while pos > 0 and data.count(b"\n") <= n and len(data) < limit:
            step = min(_BLOCK, pos)
            pos -= step
            f.seek(pos)
            data = f.read(step) + data
    cut = pos > 0 and data.count(b"\n") <= n
    if len(data) > limit:
        data, cut = data[-limit:], True
    lines = data.split(b"\n")
    if lines[-1] == b"":  # the newline that ends the last line starts no new one
        lines.pop()
    return lines[-n:], cut
