"""Capture from real processes: syscalls, vanished processes, and py-spy's stacks."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from hangkit.monitor.capture import capture
from hangkit.procfs import blocked_syscall, kernel_state


def test_a_process_that_is_gone_is_noted_not_fatal():
    done = subprocess.run([sys.executable, "-c", "pass"], timeout=30)
    assert done.returncode == 0
    gone_pid = subprocess.Popen(["true"])
    gone_pid.wait()
    (snap,) = capture([gone_pid.pid], sample_interval=0.05)
    assert snap.state == "exited" and snap.threads == []


def test_blocked_read_on_a_pipe_names_the_pipe():
    r, w = os.pipe()
    child = subprocess.Popen([sys.executable, "-c",
                              "import os,sys; print('up', flush=True); os.read(0, 1)"],
                             stdin=r, stdout=subprocess.PIPE)
    try:
        assert child.stdout.readline() == b"up\n"  # readiness: it is about to read
        # The read starts right after the print; poll until the kernel shows it, with a deadline.
        deadline = time.monotonic() + 10
        sc = blocked_syscall(child.pid)
        while not (sc and sc.name == "read") and time.monotonic() < deadline:
            sc = blocked_syscall(child.pid)
        assert sc is not None and sc.name == "read" and sc.target.startswith("pipe:")
        assert kernel_state(child.pid) == "S"
        (snap,) = capture([child.pid], sample_interval=0.1)
        assert snap.state == "blocked" and snap.syscall.name == "read"
        assert snap.main_thread.frames[-1].function == "<module>" or any(
            f.native for f in snap.main_thread.frames)
    finally:
        os.write(w, b"x")
        child.wait(timeout=10)
        os.close(r)
        os.close(w)
