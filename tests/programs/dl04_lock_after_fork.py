"""DL-04: fork while another thread holds a lock; the child waits on it forever."""

import os
import threading

from hangprog import ready

lock = threading.Lock()
holding = threading.Event()


def holder():
    with lock:
        holding.set()
        threading.Event().wait()


def child_work():
    with lock:  # held by a thread that does not exist in this process
        pass


threading.Thread(target=holder, daemon=True).start()
holding.wait(timeout=10)
if os.fork() == 0:
    child_work()
    os._exit(0)
ready()
os.wait()
