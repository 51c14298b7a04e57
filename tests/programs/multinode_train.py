"""Training across simulated nodes (tests/test_multinode.py): 4 ranks, 2 a node, DDP on gloo,
each rank with a DataLoader of 2 workers. Usage: multinode_train.py skip|worker|gil|steady

Rank 3 (on the second node) makes the hang of its mode at step 3:
- skip: it leaves to read a checkpoint from a FIFO nobody writes; ranks 0-2 wait in DDP's
  gradient all-reduce, issued from C++ in loss.backward() (TD-01 as torch records it).
- worker: one of its DataLoader workers blocks in __getitem__ (DL-01): rank 3 waits for the
  batch, ranks 0-2 in DDP's all-reduce.
- gil: it leaves for one long C call that holds the GIL, so its agent cannot answer.
- steady: no rank hangs until $HANGKIT_READY_DIR/hang-now appears (the test makes it); then
  rank 1, on the first node, leaves for a wait that never ends, and the rest wait for it.

Every rank calls hangkit.progress() each step. Each prints a heartbeat until the hang exists
(hangprog.ready()), so the silence that follows is the hang; a rank records its pid at step 2
(kind "training"), when the job is known to run, with its host, CUDA_VISIBLE_DEVICES and
whether its TMPDIR exists.
"""

import os
import sys

from hangprog import heartbeat, ready, record_pid, scratch

heartbeat()

import socket  # noqa: E402
import threading  # noqa: E402
from datetime import timedelta  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.nn.parallel import DistributedDataParallel  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402

import hangkit  # noqa: E402

ODD_STEP, ODD_RANK, WORKERS = 3, 3, 2
STUCK_INDEX = 3 * 4 + 1  # a sample of step 3 (batches of 4)


class Samples(Dataset):
    def __init__(self, stuck: str | None):
        self.stuck = stuck

    def __len__(self):
        return 10_000

    def __getitem__(self, index):
        if self.stuck and index == STUCK_INDEX:
            record_pid(kind="worker", index=index)
            with open(self.stuck, "rb") as f:  # blocks: a FIFO with no writer (a hung share)
                f.read()
        return torch.full((8,), float(index % 7))


def read_checkpoint(path):
    with open(path, "rb") as f:  # blocks: no process ever opens the FIFO for writing
        return f.read()


def hold_the_gil():
    return sum(range(10**13))  # one C call: the GIL is never released between bytecodes


def evaluate_on_rank_1():
    threading.Event().wait()


def all_agree(flag: bool) -> bool:
    """Whether any rank sees `flag`: every rank then leaves at the same step."""
    seen = torch.tensor([1.0 if flag else 0.0])
    dist.all_reduce(seen, op=dist.ReduceOp.MAX)
    return bool(seen.item())


def main():
    mode = sys.argv[1]
    rank, world = int(os.environ["PMI_RANK"]), int(os.environ["PMI_SIZE"])
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=300))
    odd = rank == ODD_RANK
    fifo = scratch(f"stalled-{rank}.fifo")
    if odd and mode in ("skip", "worker"):
        os.mkfifo(fifo)
    loader = DataLoader(Samples(fifo if odd and mode == "worker" else None), batch_size=4,
                        num_workers=WORKERS, timeout=0)
    torch.manual_seed(rank)
    model = DistributedDataParallel(torch.nn.Sequential(
        torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    for step, batch in enumerate(loader):
        hangkit.progress(step=step, phase="forward")
        if step == 2:  # what its shim gave it, on its own node
            tmpdir = os.environ.get("TMPDIR", "")
            record_pid(kind="training", rank=rank, host=socket.gethostname(),
                       gpu=os.environ.get("CUDA_VISIBLE_DEVICES"),
                       tmpdir=bool(tmpdir) and os.path.isdir(tmpdir))
        if mode == "steady" and all_agree(os.path.exists(scratch("hang-now"))):
            ready(rank=rank)
            if rank == 1:
                evaluate_on_rank_1()
        elif mode != "steady" and step == ODD_STEP:
            ready(rank=rank)
            if odd and mode == "skip":
                read_checkpoint(fifo)
            elif odd and mode == "gil":
                hangkit.agent.current_agent().reported.wait(30)  # known to the monitor first
                hold_the_gil()
        loss = model(batch).square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if mode == "worker" and step == ODD_STEP - 1:
            ready(rank=rank)  # rank 3's next batch never comes


main()
