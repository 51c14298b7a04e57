"""Single-process training script that uses torch.compile (inductor, CPU) and is slow to start
but not hung: a cold compile, during which it prints nothing.

Launch (one process, no process group; give inductor a fresh, empty cache directory):

    TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) python compile_cold_start.py

What happens: the first call of the compiled `compute_loss` traces it with dynamo, AOTAutograd
splits it into a forward and a backward graph, and inductor generates C++ kernels for the
forward (at `loss = compute_loss(x, y)`) and, at the first `loss.backward()`, for the backward,
each kernel compiled with g++. It prints one line before the first step, then nothing until the
five training steps are done ("done"), and the script exits 0: under `hangkit watch --timeout 5`
the compile is seconds of silence after output, a hang to a watchdog that does not look.

The compile is cold: the caller's TORCHINDUCTOR_CACHE_DIR holds inductor's on-disk caches (the
compiled kernels and the vector-ISA probes among them), and the script turns off the FX graph
cache, AOTAutograd's cache and inductor's precompiled C++ header, which inductor keeps outside
TORCHINDUCTOR_CACHE_DIR (in $TMPDIR/torchinductor_$USER/precompiled_headers) and which made a
second run about 5 s faster. No remote cache is on by default.

During the compile (measured on 2 cores, torch 2.13.0+cpu, no triton):
  main thread: idle nearly all the time, first in subprocess.Popen.communicate/_wait under
      VecISA.check_build / VecISA._probe_load (pick_vec_isa: g++ builds a probe library for each
      vector ISA, and a `python -c` child loads it), then in Future.result under
      CppCodeCache.load_async's load_fn (LambdaFuture.result), waiting for the kernel builds;
      user-code line `loss = compute_loss(x, y)` (-> compile_fx_forward) and later
      `loss.backward()` (-> compile_fx_backward).
  threads "ThreadPoolExecutor-1_0" and "-1_1": `_worker_compile_cpp` -> CppBuilder.build ->
      Popen.communicate, each running one g++.
  processes coming and going (children of the script): g++ -> cc1plus (0.4-2 s each), then
      collect2 -> ld; up to two g++ at a time; short-lived `python -c` ISA probes. No inductor
      compile-worker processes: the subprocess pool (SubprocPool) is only for Triton kernels,
      and without triton inductor compiles C++ kernels in a thread pool of
      compile_threads = min(32, CPUs) = 2 here. TORCHINDUCTOR_COMPILE_THREADS=1 runs each g++
      from the main thread instead (the compile then took 30 s instead of 20-22 s).
"""

import torch
import torch._functorch.config
import torch._inductor.config
import torch.nn as nn

torch._inductor.config.fx_graph_cache = False
torch._functorch.config.enable_autograd_cache = False
torch._inductor.config.cpp_cache_precompile_headers = False

STEPS = 5
BATCH = 32


def main():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(64, 128), nn.LayerNorm(128), nn.GELU(),
        nn.Linear(128, 128), nn.SiLU(),
        nn.Linear(128, 64), nn.Tanh(),
        nn.Linear(64, 10),
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    loss_fn = nn.CrossEntropyLoss()

    @torch.compile
    def compute_loss(x, y):
        return loss_fn(model(x), y)

    g = torch.Generator().manual_seed(1234)
    # What a training script says before its first step; then the compile is silent.
    print(f"training {sum(p.numel() for p in model.parameters())} parameters", flush=True)
    for _ in range(STEPS):
        x = torch.randn(BATCH, 64, generator=g)
        y = torch.randint(0, 10, (BATCH,), generator=g)
        opt.zero_grad()
        loss = compute_loss(x, y)
        loss.backward()
        opt.step()
    print("done", flush=True)


if __name__ == "__main__":
    main()
