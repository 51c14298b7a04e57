"""Many simulated ranks in one process, each on its own DEALER socket and signer, beating once a
second to the monitor in $HANGKIT_MONITOR: the sender side of bench_agent.py's capacity figure.

Usage: python agent_beats.py FIRST_RANK COUNT WORLD_SIZE. Beats are spread evenly over each
second. Runs until SIGTERM (or 120 s), then prints {"sent", "dropped"} as one JSON line.
"""

import sys

from senders import advance, send_evenly, sockets

from hangkit.records import Beat, CollectiveState
from hangkit.transport import monitor_from_environ

RANKS_PER_NODE = 4  # Polaris: 4 GPUs a node


def main() -> int:
    first, count, world = map(int, sys.argv[1:4])
    address, key = monitor_from_environ()
    ctx, socks, signers = sockets(address, key, count, hwm=8)  # the agent's own high-water mark
    messages = []
    for rank in range(first, first + count):
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

    def message(i: int) -> dict:
        advance(messages[i])
        return messages[i]

    send_evenly(ctx, socks, signers, message)
    return 0


if __name__ == "__main__":
    sys.exit(main())
