"""Many simulated ranks in one process, each on its own DEALER socket and signer, beating once a
second to the monitor in $HANGKIT_MONITOR: the sender side of bench_agent.py's capacity figure.

Usage: python agent_beats.py FIRST_RANK COUNT WORLD_SIZE. Beats are spread evenly over each
second. Runs until SIGTERM (or 120 s), then prints {"sent", "dropped"} as one JSON line.
"""

import json
import random
import signal
import sys
import time

import zmq

from hangkit.records import Beat, CollectiveState
from hangkit.transport import Signer, monitor_from_environ

RANKS_PER_NODE = 4  # Polaris: 4 GPUs a node


def main() -> int:
    first, count, world = map(int, sys.argv[1:4])
    address, key = monitor_from_environ()
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    ctx = zmq.Context()
    ctx.set(zmq.MAX_SOCKETS, count + 64)  # the default (1023) is below one process's share
    sockets, signers, messages = [], [], []
    for rank in range(first, first + count):
        sock = ctx.socket(zmq.DEALER)
        # The agent's own options (hangkit.agent.sidecar): never block, drop when full.
        for option, value in ((zmq.LINGER, 0), (zmq.IMMEDIATE, 1), (zmq.SNDHWM, 8)):
            sock.setsockopt(option, value)
        sock.connect(address)
        sockets.append(sock)
        signers.append(Signer(key))
        # Remote hosts, as on a real cluster: the monitor checks liveness of local pids only.
        node = rank // RANKS_PER_NODE
        host = f"x{3000 + node // 64}c0s{node % 64}b0n0"
        beat = Beat(pid=20000 + rank % RANKS_PER_NODE, host=host, rank=rank, world_size=world,
                    step=0, phase="forward", phase_seconds=0.05, calls=0,
                    since_progress=0.01, fields={"loss": 2.5, "lr": 3e-4},
                    collective=CollectiveState("torch", "world", "all_reduce", 0, False),
                    dump_file=f"/tmp/hangkit-dump-{rank}.txt", dump_signal=10,
                    main_ident=140000000000000 + rank)
        messages.append({"type": "beat", **beat.to_json()})

    sent = dropped = j = 0
    start, deadline = time.monotonic(), time.monotonic() + 120
    while not stopping and time.monotonic() < deadline:
        # Send j goes to rank j % count at start + j / count: each rank once a second, evenly.
        while start + j / count <= time.monotonic():
            i = j % count
            m = messages[i]
            m["step"] += 1
            m["calls"] += 6
            m["collective"]["seq"] += 1
            # Time in collectives varies between ranks, as the straggler scores expect.
            m["collective_seconds"] = round(m["collective_seconds"] + random.uniform(0.1, 0.3), 3)
            m["sent_at"] = time.time()
            try:
                sockets[i].send_multipart(signers[i].frames(m), zmq.NOBLOCK)
                sent += 1
            except zmq.Again:  # not connected yet, or the monitor is behind: the agent drops too
                dropped += 1
            j += 1
        time.sleep(max(0.0, min(start + j / count - time.monotonic(), 0.05)))
    for sock in sockets:
        sock.close(linger=0)
    ctx.term()
    print(json.dumps({"sent": sent, "dropped": dropped}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
