"""Many simulated node relays in one process, each on its own DEALER socket and signer, sending
the monitor in $HANGKIT_MONITOR one batch a second, as hangkit.shim.relay does: the sender side
of bench_multinode.py's monitor figure.

Usage: python relay_batches.py FIRST_NODE NODES RANKS_PER_NODE WORLD_SIZE. Each batch holds one
beat per rank of its node (every rank beats once a second), encoded as the relay encodes them
(hangkit.batches). Batches are spread evenly over each second. Runs until SIGTERM (or 120 s),
then prints {"sent", "dropped"} as one JSON line.
"""

import random
import sys

from senders import advance, send_evenly, sockets

from hangkit.batches import Encoder
from hangkit.records import Beat, CollectiveState
from hangkit.transport import monitor_from_environ


def node_beats(node: int, per_node: int, world: int) -> tuple[list[dict], list[dict], str]:
    """(one beat per rank of the node, its shims' records, its host)."""
    host = f"x{3000 + node // 64}c0s{node % 64}b0n0"  # remote, as on a real cluster
    beats, shims = [], []
    for local in range(per_node):
        rank = node * per_node + local
        beat = Beat(pid=20000 + local, host=host, rank=rank, world_size=world, step=0,
                    phase="forward", phase_seconds=0.05, calls=0, since_progress=0.01,
                    fields={"loss": 2.5, "lr": 3e-4},
                    collective=CollectiveState("torch", "world", "all_reduce", 0, False),
                    dump_file=f"/tmp/hangkit-stacks-{rank}.txt", dump_signal=12,
                    main_ident=140000000000000 + rank)
        beats.append({"type": "beat", **beat.to_json()})
        shims.append({"rank": rank, "local_rank": local, "shim_pid": 10000 + local,
                      "pid": 20000 + local, "alive": True, "exit": None})
    return beats, shims, host


def main() -> int:
    first, count, per_node, world = map(int, sys.argv[1:5])
    address, key = monitor_from_environ()
    ctx, socks, signers = sockets(address, key, count, hwm=16)  # the relay's own
    nodes = [(Encoder(), *node_beats(node, per_node, world))
             for node in range(first, first + count)]

    def message(i: int) -> dict:
        encoder, beats, shims, host = nodes[i]
        for beat in beats:
            advance(beat)
        # The relay's own encoding (hangkit.batches), beats held a random part of a second.
        return encoder.batch([(b, random.uniform(0.0, 1.0)) for b in beats], shims,
                             host=host, relay_pid=9999, interval=1.0)

    send_evenly(ctx, socks, signers, message)
    return 0


if __name__ == "__main__":
    sys.exit(main())
