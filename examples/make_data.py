"""Writes a synthetic classification dataset for examples/train.py.

    python examples/make_data.py --out data.npz [--samples 8192] [--features 32] [--classes 4]

Inputs are Gaussian blobs, one centre per class, so a small model learns them in a few epochs
and a falling loss shows the training really trains.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np


def make(samples: int, features: int, classes: int, seed: int = 0) -> tuple:
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 3, size=(classes, features)).astype(np.float32)
    labels = rng.integers(0, classes, size=samples)
    inputs = centres[labels] + rng.normal(0, 1, size=(samples, features)).astype(np.float32)
    return inputs.astype(np.float32), labels.astype(np.int64)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--samples", type=int, default=8192)
    parser.add_argument("--features", type=int, default=32)
    parser.add_argument("--classes", type=int, default=4)
    args = parser.parse_args(argv)
    for name in ("samples", "features", "classes"):
        if getattr(args, name) < 1:
            print(f"make_data: --{name} must be at least 1, got {getattr(args, name)}",
                  file=sys.stderr)
            return 2
    inputs, labels = make(args.samples, args.features, args.classes)
    np.savez(args.out, inputs=inputs, labels=labels)
    print(f"wrote {args.out}: {args.samples} samples, {args.features} features, "
          f"{args.classes} classes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
