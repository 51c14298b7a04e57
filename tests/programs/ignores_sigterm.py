"""Ignores SIGTERM, and so do a subprocess grandchild and a daemon that left the session.

SIGKILL is the only way to end them; the daemon double-forks with setsid, so it is neither a
descendant of the job nor in its session or process group.
"""

import os
import signal
import subprocess
import sys
import threading

from hangprog import ready, record_pid

signal.signal(signal.SIGTERM, signal.SIG_IGN)

if os.fork() == 0:  # the daemon: fork, setsid, fork again, first child exits
    os.setsid()
    if os.fork() == 0:
        record_pid(kind="daemon")
        threading.Event().wait()
    os._exit(0)

# A subprocess grandchild; signal dispositions set to SIG_IGN survive exec.
child = subprocess.Popen([sys.executable, "-c", "import threading; threading.Event().wait()"],
                         restore_signals=False)
record_pid(kind="grandchild", grandchild=child.pid)
ready(kind="main")
threading.Event().wait()
