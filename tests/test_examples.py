"""The examples' own tools."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

EXAMPLES = Path(__file__).parent.parent / "examples"


def test_make_data_writes_a_learnable_dataset(tmp_path):
    out = tmp_path / "data.npz"
    done = subprocess.run([sys.executable, str(EXAMPLES / "make_data.py"), "--out", str(out),
                           "--samples", "256", "--features", "8", "--classes", "3"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    data = np.load(out)
    assert data["inputs"].shape == (256, 8) and data["inputs"].dtype == np.float32
    assert set(np.unique(data["labels"])) <= {0, 1, 2} and data["labels"].shape == (256,)
    # Class centres differ: the per-class means are far apart compared with the noise.
    means = [data["inputs"][data["labels"] == c].mean(axis=0) for c in range(3)]
    assert min(np.linalg.norm(a - b) for i, a in enumerate(means) for b in means[i + 1:]) > 2


def test_make_data_bad_size_is_one_line(tmp_path):
    done = subprocess.run([sys.executable, str(EXAMPLES / "make_data.py"), "--out",
                           str(tmp_path / "x.npz"), "--samples", "0"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip() == "make_data: --samples must be at least 1, got 0"
