"""A job that keeps printing while its training loop is stuck: output-based detection is blind
to it; only progress beats show that nothing advances."""

import threading

from hangprog import record_pid

import hangkit


def log_forever():
    tick = threading.Event()
    while not tick.wait(0.1):
        print("loss logger: still alive", flush=True)


threading.Thread(target=log_forever, name="logger", daemon=True).start()
for step in range(5):
    hangkit.progress(step=step, phase="train")
record_pid()
hangkit.progress(phase="data")
threading.Event().wait()  # the stuck fetch
