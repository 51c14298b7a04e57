"""The bundle's .tar.gz: its default name, and writing it whole, private, under one directory."""

from __future__ import annotations

import io
import re
import socket
import tarfile
import time
from collections.abc import Mapping
from pathlib import Path

from hangkit.files import atomic_file, writable_directory


def default_name(now: float, host: str | None = None) -> str:
    short = (host or socket.gethostname()).split(".")[0]
    short = re.sub(r"[^A-Za-z0-9_-]", "_", short) or "host"
    return f"hangkit-report-{short}-{time.strftime('%Y%m%d-%H%M%S', time.localtime(now))}.tar.gz"


def write_archive(members: Mapping[str, bytes | str], path: Path, *,
                  now: float | None = None) -> Path:
    """Writes a .tar.gz, 0600 (it holds a job's configuration) whatever the umask, with every
    member under one directory named like the archive. Written beside, then renamed, so no
    half-written archive is ever at `path` (and a link planted there is replaced, never
    followed); not into a directory anyone can write (files.NotYourDirectory)."""
    path = Path(path)
    writable_directory(path.parent)
    now = time.time() if now is None else now
    prefix = re.sub(r"(\.tar\.gz|\.tgz|\.tar)$", "", path.name) or "hangkit-report"
    with atomic_file(path, mode=0o600) as f, tarfile.open(fileobj=f, mode="w:gz") as tar:
        top = tarfile.TarInfo(prefix)
        top.type, top.mode, top.mtime = tarfile.DIRTYPE, 0o700, int(now)
        tar.addfile(top)
        for name, data in members.items():
            raw = data.encode("utf-8", "surrogateescape") if isinstance(data, str) else data
            info = tarfile.TarInfo(f"{prefix}/{name}")
            info.size, info.mode, info.mtime = len(raw), 0o600, int(now)
            tar.addfile(info, io.BytesIO(raw))
    return path
