"""HF Accelerate training loop in which only the main process calls
`accelerator.wait_for_everyone()`.

Launch (3 processes, CPU, gloo):

    accelerate launch --multi_gpu --num_processes 3 --num_machines 1 --mixed_precision no \\
        --dynamo_backend no --main_process_port 29551 accelerate_main_only_wait.py

(`accelerate launch --cpu --num_processes 3` starts only ONE process unless given an mpirun
hostfile, and `--cpu` cannot be combined with `--multi_gpu`; `--multi_gpu` is what makes
accelerate start 3 processes through torchrun, and `Accelerator(cpu=True)` in the script keeps
them on the CPU with gloo.) Equivalent, also verified:

    torchrun --nproc-per-node 3 --master-port 29551 accelerate_main_only_wait.py

The hang: at step 3 the loop does `if accelerator.is_main_process:
accelerator.wait_for_everyone()` (meant as "let the others catch up before I log/save").
wait_for_everyone() is a barrier that every process must enter, so rank 0 (the odd rank) waits
in it, while ranks 1 and 2 go on with step 3 and wait in DDP's gradient all_reduce inside
`accelerator.backward(loss)`. Nothing errors until the process-group timeout (300 s).

Where each rank waits:
  rank 0:         `accelerator.wait_for_everyone()` in main() -> PartialState.wait_for_everyone
                  -> dist.barrier (Flight Recorder: gloo:barrier)
  rank 1, rank 2: `accelerator.backward(loss)` in main() -> loss.backward() -> DDP reducer's
                  bucket all_reduce (Flight Recorder: gloo:all_reduce)
"""

from datetime import timedelta

import torch
import torch.nn as nn
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs
from torch.utils.data import DataLoader, TensorDataset


def main():
    accelerator = Accelerator(cpu=True,
                              kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=300))])
    torch.manual_seed(0)
    x = torch.randn(3 * 8 * 16, 32)
    y = torch.randint(0, 4, (3 * 8 * 16,))
    loader = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 4))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    loss_fn = nn.CrossEntropyLoss()

    model.train()
    for step, (xb, yb) in enumerate(loader):
        if step == 3 and accelerator.is_main_process:
            accelerator.wait_for_everyone()
            accelerator.print(f"step {step}: everyone caught up, logging")
        loss = loss_fn(model(xb), yb)
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        print(f"[rank {accelerator.process_index}] step {step}: loss {loss.item():.4f}", flush=True)
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main()
