"""Benchmark of the safe DataLoader (hangkit.training.dataloader): two figures.

1. Throughput. An in-memory dataset of small tensors (a few microseconds per sample, so the
   per-sample bookkeeping of the safe loader is as visible as it can be), 2 fork workers,
   batch_size 32: one epoch of 4,096 samples through a plain torch DataLoader and through the
   safe one (built once; each epoch starts its workers anew, as persistent_workers=False does for
   both), interleaved A/B, B/A over 8 rounds; medians of samples per second. Goal: ratio
   safe/plain >= 0.98.
2. Cost of test-before-use: the seconds safe_dataloader() takes to build and test (one batch
   with the same workers, then shut them down), median of 5. Printed, no goal.

Run from the repository root:  .venv/bin/python benchmarks/bench_training_dataloader.py
(about half a minute). Always exits 0; a missed goal is printed as MISSED.
"""

from __future__ import annotations

import logging
import statistics
import time

import torch
from torch.utils.data import DataLoader

from hangkit.training.dataloader import safe_dataloader

SAMPLES, BATCH, WORKERS, ROUNDS = 4096, 32, 2, 8


class Samples:
    def __init__(self, n):
        self.data = torch.arange(n * 8, dtype=torch.float32).reshape(n, 8)

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        return self.data[i] * 2


def epoch(loader) -> float:
    started = time.perf_counter()
    count = 0
    for batch in loader:
        count += len(batch)
    assert count == SAMPLES
    return count / (time.perf_counter() - started)


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    dataset = Samples(SAMPLES)
    plain = DataLoader(dataset, batch_size=BATCH, num_workers=WORKERS, timeout=60,
                       multiprocessing_context="fork")
    safe = safe_dataloader(dataset, batch_size=BATCH, num_workers=WORKERS, timeout=60,
                           test_timeout=60, multiprocessing_context="fork")
    assert safe.num_workers == WORKERS
    epoch(plain), epoch(safe)  # warm-up
    rates = {"plain": [], "safe": []}
    for r in range(ROUNDS):
        order = (("plain", plain), ("safe", safe)) if r % 2 == 0 else (
            ("safe", safe), ("plain", plain))
        for name, loader in order:
            rates[name].append(epoch(loader))
    p, s = statistics.median(rates["plain"]), statistics.median(rates["safe"])
    ratio = s / p
    print(f"1. throughput ({WORKERS} workers, batch {BATCH}, {SAMPLES} samples/epoch, "
          f"median of {ROUNDS}):")
    print(f"   plain DataLoader {p:,.0f} samples/s, safe {s:,.0f} samples/s")
    print(f"   goal: safe/plain >= 0.98; ratio {ratio:.3f}: {'met' if ratio >= 0.98 else 'MISSED'}")

    costs = []
    for _ in range(5):
        started = time.perf_counter()
        safe_dataloader(dataset, batch_size=BATCH, num_workers=WORKERS, timeout=60,
                        test_timeout=60, multiprocessing_context="fork")
        costs.append(time.perf_counter() - started)
    print(f"2. test-before-use: {statistics.median(costs):.3f} s median of 5 "
          f"(min {min(costs):.3f} s, max {max(costs):.3f} s); no goal")


if __name__ == "__main__":
    main()
