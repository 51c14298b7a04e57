"""A Monitor alone in its own process, as under `hangkit watch` (never in a rank's process):
for the benchmarks' rank-side figures. Prints {"address", "key"} as one JSON line, then runs
until SIGTERM (or 600 s) and prints {"beats", "batches"}: what it received."""

import json
import signal
import sys
import threading

from hangkit.monitor.server import Monitor


def main() -> int:
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    monitor = Monitor(bind="127.0.0.1")
    print(json.dumps({"address": monitor.address, "key": monitor.key}), flush=True)
    done.wait(600)
    with monitor.lock:
        counts = {"beats": monitor.collector.beats,
                  "batches": sum(n.batches for n in monitor.collector.nodes.values())}
    monitor.close()
    print(json.dumps(counts), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
