"""The examples' own tools."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

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


def test_train_runs_to_the_end_on_four_ranks_and_learns(tmp_path):
    from conftest import mpiexec

    from hangkit.launcher import free_port

    data = tmp_path / "data.npz"
    subprocess.run([sys.executable, str(EXAMPLES / "make_data.py"), "--out", str(data),
                    "--samples", "1024"], check=True, capture_output=True, timeout=60)
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    done = subprocess.run([mpiexec(), "-n", "4", sys.executable, str(EXAMPLES / "train.py"),
                           "--config", str(EXAMPLES / "config.yaml"), "--datafile", str(data),
                           "--cluster", "local", "--no_wandb"],
                          capture_output=True, text=True, timeout=170, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    finals = sorted(re.findall(r"rank (\d) of 4: (\d+) steps; mean loss epoch 0: ([\d.]+), "
                               r"epoch 1: ([\d.]+)", done.stdout))
    assert [r for r, *_ in finals] == ["0", "1", "2", "3"], done.stdout
    for _, steps, first, last in finals:
        assert int(steps) == 16 and float(last) < float(first) / 2  # it learns


@pytest.mark.parametrize("config, words", [
    ("batch_size: [", "does not parse"),
    ("epochs: 0", "epochs must be a whole number >= 1, got 0"),
])
def test_train_bad_config_is_one_line(tmp_path, config, words):
    path = tmp_path / "bad.yaml"
    path.write_text(config)
    done = subprocess.run([sys.executable, str(EXAMPLES / "train.py"), "--config", str(path),
                           "--datafile", str(tmp_path / "none.npz")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.startswith("train: error: the config") and words in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
