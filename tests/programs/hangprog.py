"""Shared by the hang programs: a heartbeat until the hang exists, then a readiness record.

A watched program must not look hung while it starts (importing torch on a loaded machine takes
seconds of silence), and must look hung the moment the hang exists. So each program prints a
heartbeat from start-up until it calls ready(), right before it blocks. ready() also records
the program's pid (and anything else worth checking) in $HANGKIT_READY_DIR for the test.
"""

import json
import os
import sys
import threading

_stop = threading.Event()


def heartbeat(interval: float = 0.2) -> None:
    def beat():
        while not _stop.wait(interval):
            os.write(1, b".\n")

    threading.Thread(target=beat, name="heartbeat", daemon=True).start()


def ready(**info) -> None:
    """Call right before blocking: the silence that follows is the hang."""
    _stop.set()
    record_pid(**info)
    print(f"ready pid={os.getpid()}", flush=True)


def record_pid(**info) -> None:
    directory = os.environ.get("HANGKIT_READY_DIR")
    if directory:
        from hangkit.files import write_atomic  # the test reads the record whole or not at all

        path = os.path.join(directory, f"pid-{os.getpid()}-{info.get('kind', 'main')}.json")
        write_atomic(path, json.dumps({"pid": os.getpid(), "argv": sys.argv, **info}))


def scratch(name: str) -> str:
    """A path in the test's own directory, for FIFOs and the like."""
    return os.path.join(os.environ.get("HANGKIT_READY_DIR", "/tmp"), name)
