"""A Monitor alone in its own process, so its CPU time is its own: the collector side of
bench_agent.py's capacity figure.

Usage: python agent_collector.py RANKS WINDOW. Prints {"address", "key"} as one JSON line, waits
(at most 60 s) until the collector holds RANKS tracks, settles for a second, then measures two
windows of WINDOW seconds each: "ingest" (the receiving thread alone) and "watch" (plus a thread
that calls monitor.detect() every 0.25 s, as `hangkit watch` does; detect() paces itself).
Prints the results as a second JSON line and exits.
"""

import json
import sys
import threading
import time

import psutil

from hangkit.batches import COLUMNS
from hangkit.monitor.server import Monitor

WATCH_TICK = 0.25  # hangkit.monitor.watch.TICK
SENT_AT = COLUMNS.index("sent_at")  # in a relay's rows


def main() -> int:
    ranks, window = int(sys.argv[1]), float(sys.argv[2])
    monitor = Monitor(bind="127.0.0.1")
    # Send-to-receipt latency: the sender's clock at send against ours once a message is
    # verified, just before it is taken in (same machine): for a beat its sent_at, for a
    # relay's batch that of its rows. Patched on this instance only; list.append is atomic,
    # so the threads need no lock for it.
    latencies: list[float] = []
    verify = monitor.verifier.open

    def timed_open(frames):
        message = verify(frames)
        if message is not None and message.get("type") == "beat":
            latencies.append(time.time() - message["sent_at"])
        elif message is not None and message.get("type") == "batch" and message["rows"]:
            sent_at = message["rows"][0][SENT_AT]
            latencies.extend([time.time() - sent_at] * len(message["rows"]))
        return message

    monitor.verifier.open = timed_open
    print(json.dumps({"address": monitor.address, "key": monitor.key}), flush=True)

    deadline = time.monotonic() + 60
    while len(monitor.collector.tracks) < ranks and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(1.0)  # let the senders' connection burst drain before measuring
    me = psutil.Process()
    steps: list[float] = []
    stop = threading.Event()

    def watch_loop():
        while not stop.wait(WATCH_TICK):
            due, t = monitor._next_detection, time.perf_counter()
            monitor.detect()
            if monitor._next_detection != due:  # detection ran this time
                steps.append(time.perf_counter() - t)

    results = {}
    for name in ("ingest", "watch"):
        if name == "watch":
            threading.Thread(target=watch_loop, daemon=True).start()
        cpu0, wall0, i0, beats0 = sum(me.cpu_times()[:2]), time.monotonic(), len(latencies), \
            monitor.collector.beats
        time.sleep(window)
        cpu1, wall1, i1, beats1 = sum(me.cpu_times()[:2]), time.monotonic(), len(latencies), \
            monitor.collector.beats
        results[name] = {"cpu": (cpu1 - cpu0) / (wall1 - wall0), "wall": wall1 - wall0,
                         "latencies": latencies[i0:i1], "beats": beats1 - beats0}
    stop.set()
    with monitor.lock:
        results["tracks"] = len(monitor.collector.tracks)
        results["dropped"] = monitor.verifier.dropped.total
    results["steps"] = steps
    print(json.dumps(results), flush=True)
    monitor.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
