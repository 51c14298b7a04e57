"""Reading stacks: whose code a frame is, short file names, and the frames that matter."""

from __future__ import annotations

import linecache
import os
import re

from hangkit.records import Frame, ProcessSnapshot, ThreadStack

# The slash after each match is a lookahead, so stdlib and site-packages matches can touch.
_LIBRARY_PATH = re.compile(r"/(?:(?:site|dist)-packages|lib(?:64)?/python\d+\.\d+)(?=/)")
_DEMO_PATH = f"{os.sep}hangkit{os.sep}demo{os.sep}"
# hangkit's own rank-side code (progress(), the collective wrappers) is a library, even when
# hangkit is installed from a checkout (pip install -e) rather than into site-packages.
_AGENT_PATH = f"{os.sep}hangkit{os.sep}agent{os.sep}"
_IPYTHON_SHELL = "IPython/core/interactiveshell.py"


def is_user_frame(frame: Frame) -> bool:
    """The user's own code: not native, not the standard library, not an installed package.

    Paths are judged by shape, not against this interpreter's sysconfig, because the ranks may
    run another Python (a conda module) than the watcher does. hangkit's demo job stands in for
    user code, so it counts as such wherever hangkit is installed.
    """
    if frame.native or frame.file.startswith("<") or _AGENT_PATH in frame.file:
        return False
    return _DEMO_PATH in frame.file or not _LIBRARY_PATH.search(frame.file)


def short_path(path: str) -> str:
    """site-packages/torch/x.py -> torch/x.py; a file under the current directory -> relative."""
    ends = [m.end() + 1 for m in _LIBRARY_PATH.finditer(path)]
    if ends:
        return path[ends[-1]:]
    try:
        rel = os.path.relpath(path)
    except ValueError:
        return path
    return path if rel.startswith("..") else rel


def bare_name(frame: Frame) -> str:
    """py-spy qualifies methods ('_MultiProcessingDataLoaderIter._next_data'): the last part."""
    return frame.function.rsplit(".", 1)[-1]


def where(frame: Frame) -> str:
    """'save_checkpoint at train.py:21': reads after 'is in' or 'waits in'."""
    line = f":{frame.line}" if frame.line else ""
    return f"{frame.function} at {short_path(frame.file)}{line}"


def frame_text(frame: Frame) -> str:
    """'all_reduce (torch/distributed/distributed_c10d.py:3252)'; a native frame by library name."""
    path = os.path.basename(frame.file) if frame.native else short_path(frame.file)
    return f"{frame.function} ({path}" + (f":{frame.line})" if frame.line else ")")


def innermost_user_frame(thread: ThreadStack) -> Frame | None:
    return next((f for f in reversed(thread.frames) if is_user_frame(f)), None)


def is_instrumentation(frame: Frame) -> bool:
    """hangkit's own wrappers around collectives: transparent, never where a rank "is"."""
    return not frame.native and _AGENT_PATH in frame.file


def innermost_python_frame(thread: ThreadStack) -> Frame | None:
    return next((f for f in reversed(thread.frames)
                 if not f.native and not is_instrumentation(f)), None)


def tree_frames(thread: ThreadStack) -> list[Frame]:
    """The Python frames, then the one native function the innermost Python frame called.

    Deeper native frames (sched_yield, poll, futex) differ between ranks that wait in the same
    place, and would split the merged tree at its leaves without saying anything new.
    """
    frames: list[Frame] = []
    start = 0
    while start < len(thread.frames) and "runpy" in thread.frames[start].file:
        start += 1  # `python -m` start-up frames, the same in every process
    # An ipyparallel engine's (or a kernel's) frames down to IPython running the cell's code:
    # the same on every engine; the cell starts below them.
    for i, f in enumerate(thread.frames):
        if f.file.endswith(_IPYTHON_SHELL) and bare_name(f) == "run_code":
            start = i + 1
    for i, f in enumerate(thread.frames[start:], start):
        if is_instrumentation(f):
            continue
        if not f.native:
            frames.append(f)
        elif i > start and not thread.frames[i - 1].native and not _is_interpreter(f):
            frames.append(f)
            break
    return frames


def _is_interpreter(frame: Frame) -> bool:
    return "libpython" in os.path.basename(frame.file) and not frame.function.startswith("time_")


def source_line(frame: Frame) -> str:
    """The source text of a frame's line: as read where its process runs, else from the file
    here (empty when it cannot be read)."""
    if frame.native or not frame.line:
        return ""
    if frame.code is not None:
        return frame.code
    return linecache.getline(frame.file, frame.line).strip()


# Conditions that tell ranks apart: the branch a rank-only call sits under (FW-01..03).
_RANK_CONDITION = re.compile(r"rank|is_main_process|is_local_main_process|is_global_zero|"
                             r"is_world_process_zero|process_index|is_main\b")
_BRANCH_LOOKBACK = 40  # lines: an if further up than this is not the call's own branch


def rank_branch(frame: Frame | None) -> str | None:
    """'`if accelerator.is_main_process:` at train.py:52': the rank-dependent if (or elif)
    the frame's line sits under, from the file here; None where there is none."""
    if frame is None or frame.native or not frame.line:
        return None
    lines = linecache.getlines(frame.file)
    if not 0 < frame.line <= len(lines):
        return None
    indent = _indent(lines[frame.line - 1])
    for n in range(frame.line, max(frame.line - _BRANCH_LOOKBACK, 0), -1):
        text = lines[n - 1].strip()
        outer = n == frame.line or _indent(lines[n - 1]) < indent
        if not text or text.startswith("#") or not outer:
            continue
        indent = _indent(lines[n - 1])
        if text.startswith(("if ", "elif ")) and _RANK_CONDITION.search(text.split(":")[0]):
            head = text if n != frame.line else text.split(":")[0] + ":"
            return f"`{head}` at {short_path(frame.file)}:{n}"
        if indent == 0:
            break
    return None


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def main_location(p: ProcessSnapshot) -> str:
    """Where a process's main thread stands, in the user's terms."""
    thread = p.main_thread
    if thread is None and p.state == "exited":
        return f"exited ({p.note})" if p.note else "exited"
    if thread is None:
        return f"no stack ({p.stack_error or 'not captured'})"
    frame = innermost_user_frame(thread) or innermost_python_frame(thread)
    return where(frame) if frame else "no Python frames"


def describe_state(p: ProcessSnapshot) -> str:
    """'blocked, 0% CPU, openat of /tmp/ckpt (a FIFO)': what a process was found doing."""
    words = p.state
    if p.cpu_percent is not None:
        words += f", {p.cpu_percent:.0f}% CPU"
    if p.syscall:
        words += ", " + p.syscall.describe()
    return words
