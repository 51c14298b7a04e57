"""What the benchmarks' simulated senders share (agent_beats.py, relay_batches.py): many DEALER
sockets in one process, each sending once a second, evenly spread, until SIGTERM; and a beat's
second of training."""

import json
import random
import signal
import time

import zmq

from hangkit.transport import Signer

RUN_SECONDS = 120.0  # at most, when nobody sends SIGTERM


def sockets(address: str, key: str, count: int, hwm: int) -> tuple:
    """(the context, count DEALER sockets connected to address, a Signer for each), with the
    options of hangkit's own senders: never block, drop when full."""
    ctx = zmq.Context()
    ctx.set(zmq.MAX_SOCKETS, count + 64)  # the default (1023) is below one process's share
    socks = []
    for _ in range(count):
        sock = ctx.socket(zmq.DEALER)
        for option, value in ((zmq.LINGER, 0), (zmq.IMMEDIATE, 1), (zmq.SNDHWM, hwm)):
            sock.setsockopt(option, value)
        sock.connect(address)
        socks.append(sock)
    return ctx, socks, [Signer(key) for _ in range(count)]


def advance(beat: dict) -> None:
    """A second of training since the last beat; time in collectives varies between ranks, as
    the straggler scores expect."""
    beat["step"] += 1
    beat["calls"] += 6
    beat["collective"]["seq"] += 1
    beat["collective_seconds"] = round(beat["collective_seconds"] + random.uniform(0.1, 0.3), 3)
    beat["sent_at"] = time.time()


def send_evenly(ctx, socks: list, signers: list, message) -> None:
    """Send j goes to socket j % count at start + j / count: each once a second, evenly;
    message(i) makes socket i's next message. Until SIGTERM (or RUN_SECONDS); then prints
    {"sent", "dropped"} (not connected yet, or the monitor behind: dropped, as hangkit's own
    senders drop) as one JSON line and closes everything."""
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    count, sent, dropped, j = len(socks), 0, 0, 0
    start = time.monotonic()
    while not stopping and time.monotonic() < start + RUN_SECONDS:
        while start + j / count <= time.monotonic():
            i = j % count
            try:
                socks[i].send_multipart(signers[i].frames(message(i)), zmq.NOBLOCK)
                sent += 1
            except zmq.Again:
                dropped += 1
            j += 1
        time.sleep(max(0.0, min(start + j / count - time.monotonic(), 0.05)))
    for sock in socks:
        sock.close(linger=0)
    ctx.term()
    print(json.dumps({"sent": sent, "dropped": dropped}), flush=True)
