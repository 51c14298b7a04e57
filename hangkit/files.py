"""Files hangkit writes and reads: written whole or not at all, private where they hold a
job's secrets, and read from their end where they may be gigabytes.

A reader (the doctor collecting a rank's result, a person opening a report while the job is
ended) must never see half a file, so every file is written beside its place and renamed onto
it (os.replace is atomic within a filesystem).

In a shared place (a group's project directory, /tmp) another user may have prepared the path
hangkit is about to write: a symbolic link to a directory of theirs, a directory they can write
into. So the temporary file is created exclusively (O_EXCL: never through a link), the rename
replaces a link at the final name rather than following it, and the directory is checked
first: private_directory for a report's, writable_directory for a single file's.
"""

from __future__ import annotations

import contextlib
import errno
import os
import pwd
import secrets
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from hangkit.errors import HangkitError

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


class NotYourDirectory(HangkitError, PermissionError):
    """A directory hangkit was to write into that someone else could change under it: a
    symbolic link, another user's, or one others can write into. `path`, and `why` in words."""

    def __init__(self, path: str | os.PathLike, why: str):
        super().__init__(f"{path}: {why}", hint="give a new path, or a directory of yours "
                         "that only you can write")
        self.path, self.why = Path(path), why


def default_report_dir() -> Path:
    """Where a hang report goes when no directory was given (watch, attach): a new one under
    the current one."""
    return Path(f"hangkit-report-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")


def private_directory(directory: str | os.PathLike) -> Path:
    """The directory, made 0700 if it is new (reports hold stacks and environments). One that
    exists already is used only if it is yours: a real directory (not a symbolic link, which
    another user may have planted in a shared place), owned by you, and not writable by group
    or others. NotYourDirectory (a PermissionError) otherwise."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.mkdir(directory, 0o700)  # exclusive: a link planted at the name is not followed
        created = True
    except FileExistsError:
        created = False
    try:  # checked on what was opened, not on the name: nothing can be swapped in between
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            raise NotYourDirectory(directory, _not_a_directory(directory)) from None
        raise
    try:
        st = os.fstat(fd)
        if st.st_uid != os.geteuid():
            raise NotYourDirectory(directory, f"owned by {_user(st.st_uid)}, not by you")
        if created:
            os.fchmod(fd, 0o700)  # mkdir's mode is filtered by the umask
        elif st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise NotYourDirectory(directory, "writable by group or others (mode "
                                   f"{stat.S_IMODE(st.st_mode):04o})")
    finally:
        os.close(fd)
    return directory


def writable_directory(directory: str | os.PathLike) -> Path:
    """The directory a single private file (0600, made by atomic_file) may be created in:
    not one that anyone can write into without the sticky bit (there they could replace the
    file once it is written). A group's project directory, and /tmp, are fine.
    NotYourDirectory otherwise; a missing directory is the caller's OSError to find."""
    directory = Path(directory)
    st = os.stat(directory)
    if st.st_mode & stat.S_IWOTH and not st.st_mode & stat.S_ISVTX:
        raise NotYourDirectory(directory, f"{_user(st.st_uid)}'s directory that anyone can "
                               f"write into (mode {stat.S_IMODE(st.st_mode):04o})")
    return directory


def _not_a_directory(path: Path) -> str:
    try:
        st = os.lstat(path)
    except OSError as e:
        return e.strerror or str(e)
    if stat.S_ISLNK(st.st_mode):
        target = os.readlink(path)
        return f"a symbolic link (to {target}, owned by {_user(st.st_uid)}): not followed"
    return "not a directory"


def _user(uid: int) -> str:
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:  # a uid with no name here (a container, another node's user)
        return f"uid {uid}"


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
