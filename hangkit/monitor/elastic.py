"""torchrun's elastic agent, read for a verdict: its command line (how many nodes it waits for,
at which endpoint) and whether its stack stands in rendezvous (FW-04: a node whose launch line
failed leaves the others' agents waiting, silent, until the join timeout)."""

from __future__ import annotations

from dataclasses import dataclass

from hangkit.monitor.stacks import bare_name
from hangkit.records import ProcessSnapshot

# Where the agent waits for the other nodes: the dynamic (c10d, etcd) handler and the static
# one (--rdzv-backend static, torchrun's default with --master-addr).
_RENDEZVOUS = frozenset({"next_rendezvous", "_rendezvous"})
_ELASTIC_FILES = ("torch/distributed/elastic/",)
_DEFAULT_PORT = "29500"  # torchrun's own


@dataclass(frozen=True)
class TorchrunArgs:
    nnodes: str  # "2", or "1:4" for an elastic range
    node_rank: str | None
    endpoint: str  # host:port the nodes meet at
    nproc_per_node: str | None
    rest: tuple[str, ...]  # the training command and its arguments

    @property
    def min_nodes(self) -> int | None:
        first = self.nnodes.split(":")[0]
        return int(first) if first.isdigit() else None


def torchrun_args(cmdline: list[str]) -> TorchrunArgs | None:
    """torchrun's options from its command line (`python .../torchrun ...` or `python -m
    torch.distributed.run ...`), None for another program."""
    words = list(cmdline)
    start = next((i + 1 for i, w in enumerate(words) if w.endswith("/torchrun") or w in (
        "torchrun", "torch.distributed.run", "torch.distributed.launch")), None)
    if start is None:
        return None
    options: dict[str, str] = {}
    i = start
    while i < len(words) and words[i].startswith("-"):
        name, eq, value = words[i].lstrip("-").replace("_", "-").partition("=")
        if not eq and i + 1 < len(words) and not words[i + 1].startswith("-"):
            value, i = words[i + 1], i + 1
        options[name] = value
        i += 1
    endpoint = options.get("rdzv-endpoint") or (
        f"{options.get('master-addr', '127.0.0.1')}:{options.get('master-port', _DEFAULT_PORT)}")
    return TorchrunArgs(nnodes=options.get("nnodes", "1"), node_rank=options.get("node-rank"),
                        endpoint=endpoint, nproc_per_node=options.get("nproc-per-node"),
                        rest=tuple(words[i:]))


def in_rendezvous(p: ProcessSnapshot) -> bool:
    thread = p.main_thread
    return thread is not None and any(
        not f.native and bare_name(f) in _RENDEZVOUS and any(e in f.file for e in _ELASTIC_FILES)
        for f in thread.frames)


def missing_node_line(args: TorchrunArgs, node_rank: int) -> str:
    """The launch line a missing node runs: the same options, its own node rank."""
    nproc = f" --nproc-per-node {args.nproc_per_node}" if args.nproc_per_node else ""
    return (f"torchrun --nnodes {args.nnodes}{nproc} --node-rank {node_rank} "
            f"--rdzv-backend c10d --rdzv-endpoint {args.endpoint} {' '.join(args.rest)}").strip()
