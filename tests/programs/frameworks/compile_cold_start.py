"""Single-process training script that uses torch.compile (inductor, CPU) and is slow to start
but not hung: a cold compile, during which it prints nothing.

Launch (one process, no process group; give inductor a fresh, empty cache directory):

    TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) python compile_cold_start.py

What happens: the first call of the compiled model traces it with dynamo, builds the forward and
backward graphs with AOTAutograd and has inductor generate C++ kernels for them, each compiled
with g++. Nothing is printed until the training steps are done ("done"), and the script exits 0.
The compile is cold: the caller's TORCHINDUCTOR_CACHE_DIR holds inductor's on-disk caches (the
compiled kernels among them), and the script turns off the FX graph cache and AOTAutograd's cache
so that it never reuses a compiled graph. No remote cache is on by default.

See README.md for the measured duration and the processes seen during the compile.
"""

import torch
import torch._functorch.config
import torch._inductor.config
import torch.nn as nn

torch._inductor.config.fx_graph_cache = False
torch._functorch.config.enable_autograd_cache = False

STEPS = 5
BATCH = 32


def main():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(64, 128), nn.GELU(),
        nn.Linear(128, 128), nn.SiLU(),
        nn.Linear(128, 64), nn.Tanh(),
        nn.Linear(64, 10),
    )
    compiled = torch.compile(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    loss_fn = nn.CrossEntropyLoss()
    g = torch.Generator().manual_seed(1234)
    for _ in range(STEPS):
        x = torch.randn(BATCH, 64, generator=g)
        y = torch.randint(0, 10, (BATCH,), generator=g)
        opt.zero_grad()
        loss = loss_fn(compiled(x), y)
        loss.backward()
        opt.step()
    print("done", flush=True)


if __name__ == "__main__":
    main()
