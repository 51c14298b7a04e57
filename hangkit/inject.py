"""The hook that gives every rank of a job an agent, with no change to its code.

`hangkit watch`, `hangkit rank` and EngineCluster put a private directory at the front of the
job's PYTHONPATH holding bootstrap.py as `sitecustomize.py`, which every Python process of the
job then runs at start (bootstrap.py says what it decides there), and a link to this hangkit,
for ranks on an interpreter that does not have it installed.

Why a sitecustomize on PYTHONPATH and not a `.pth` file installed with the package: PYTHONPATH
reaches every interpreter the job runs (a rank in a conda env on another Python gets its
stacks from py-spy and an agent wherever it can import one), it is there only for the jobs
hangkit runs and gone with them, and the user's own sitecustomize and usercustomize still run
(bootstrap.py chains to them). A `.pth` would run in every Python process of the environment,
watched or not, and only in the one it was installed in.

The directory is 0700 and its files 0600, so nobody else can plant code in the ranks; hangkit
removes it when the job (or the rank, for a shim's) is over. Rank processes that find they
cannot start an agent leave a note there (`no-agent-PID`), which the capture reads for the
report.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tempfile
from pathlib import Path

from hangkit.bootstrap import INJECT_VARIABLE, NO_AGENT_PREFIX, WATCHER_VARIABLE

HOOK_PREFIX = "hangkit-hook-"
# $HANGKIT_INJECT: the job's hook directory (watch's or EngineCluster's, on its node), or this.
# A `hangkit rank` on another node makes one of its own for its rank.
INJECT_OFF = "off"  # the user turned it off: the report says so
NOTE_BYTES = 500  # what a no-agent note may hold: one line of reason


def inject_environment(env: dict[str, str], *, on: bool = True,
                       watcher: int | None = None) -> tuple[dict[str, str], str | None]:
    """(the job's environment, the hook directory to remove once the job is over, or None).
    Off: the variable says so, for the report, and no hook is on the path. `watcher`: the pid
    whose child is the job's main process (hangkit watch)."""
    env = dict(env)
    previous = env.get(INJECT_VARIABLE)
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep)
             if p and p != previous]  # a hook of an outer hangkit is replaced, not stacked
    if not on:
        env[INJECT_VARIABLE] = INJECT_OFF
        _set_path(env, paths)
        return env, None
    hook = os.path.realpath(tempfile.mkdtemp(prefix=HOOK_PREFIX))  # 0700
    try:
        source = Path(__file__).with_name("bootstrap.py")
        fd = os.open(os.path.join(hook, "sitecustomize.py"),
                     os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(source.read_bytes())
        os.symlink(Path(__file__).parent, os.path.join(hook, "hangkit"))
    except OSError:
        remove_hook(hook)
        raise
    env[INJECT_VARIABLE] = hook
    if watcher is not None:
        env[WATCHER_VARIABLE] = str(watcher)
    _set_path(env, [hook, *paths])
    return env, hook


def _set_path(env: dict[str, str], paths: list[str]) -> None:
    if paths:
        env["PYTHONPATH"] = os.pathsep.join(paths)
    else:
        env.pop("PYTHONPATH", None)


def remove_hook(hook: str | None) -> None:
    if hook:
        shutil.rmtree(hook, ignore_errors=True)


def wanted(env: dict[str, str] | None) -> bool:
    """Whether the job wants the hook (on, or a directory)."""
    return (env or {}).get(INJECT_VARIABLE, INJECT_OFF) != INJECT_OFF


def needs_own_hook(env: dict[str, str]) -> bool:
    """Whether a shim must give its rank a hook of its own: the job wants one, and the job's
    directory is not here (watch's lies on its node only) or not ours."""
    return wanted(env) and not _ours(env.get(INJECT_VARIABLE, ""))


def _ours(path: str) -> bool:
    """A private directory of this user's: one another user made could hold any code."""
    if not os.path.isabs(path):
        return False
    try:
        info = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid() and \
        not stat.S_IMODE(info.st_mode) & 0o077


def described(env: dict[str, str] | None) -> str:
    """What the report's context says of it."""
    if wanted(env):
        return "on: hangkit's agent was started in every rank (--no-inject turns it off)"
    return ("off (--no-inject): only ranks that call hangkit.progress() or start_agent() had "
            "an agent")


def no_agent_note(pid: int, env: dict[str, str] | None) -> str | None:
    """Why the rank with this pid and environment had no agent: injection was off, or the
    note it left in its hook directory. Read only from a directory of ours (owner and mode
    checked), and at most NOTE_BYTES of it."""
    hook = (env or {}).get(INJECT_VARIABLE)
    if hook == INJECT_OFF:
        return "injection was off (--no-inject)"
    if not hook or not _ours(hook):
        return None
    with contextlib.suppress(OSError):
        fd = os.open(os.path.join(hook, f"{NO_AGENT_PREFIX}{pid}"), os.O_RDONLY | os.O_NOFOLLOW)
        with os.fdopen(fd, "rb") as f:
            if os.fstat(f.fileno()).st_uid != os.getuid():
                return None
            return f.read(NOTE_BYTES).decode(errors="replace").strip() or None
    return None
