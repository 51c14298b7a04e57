"""The examples' own tools."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
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


INJECT_CONFIG = """\
model: {hidden: 32, layers: 1}
batch_size: 32
epochs: 3
num_workers: 1
timeouts: {init: 30, dataloader: 4, barrier: 6, step: 20, wandb: 4}
"""
# Each --inject on 2 ranks (256 samples: 4 steps an epoch), with what must catch it.
# Recoverable ones end one epoch on every rank and train to the end (exit 0).
INJECTIONS = {
    "worker_stuck:rank=1:step=2": (0, [
        r"DataLoaderHang: rank 1: DataLoader got no batch within 4 s: worker 0 \(pid \d+\) "
        r"fetching dataset index \d+ for [\d.]+ s",
        r"worker 0's stack \(innermost last\):(.|\n)*inject.py.*in InjectingDataset.__getitem__",
        r"PeerFailed: rank 1 failed at step 2: rank 1: DataLoaderHang"]),
    "worker_killed:rank=0:step=6": (0, [
        r"DataLoaderWorkerDied: rank 0: DataLoader worker 0 \(pid \d+\) killed by signal 9 "
        r"\(SIGKILL\) while fetching dataset index \d+",
        r"PeerFailed: rank 0 failed at step [56]: rank 0: DataLoaderWorkerDied"]),
    "exception:rank=1:step=5": (0, [
        r"PeerFailed: rank 1 failed at step 5: rank 1: RuntimeError: Caught RuntimeError in "
        r"DataLoader worker process 0\. RuntimeError: injected: sample \d+ on rank 1 is corrupt"]),
    "skip_collective:rank=1:step=1": (1, [
        r"train: error: barrier #1 timed out after 6 s on rank 0: rank 1 did not arrive",
        r"train: error: .* on rank 1: "]),
    "uneven_batches:rank=1": (1, [
        r"train: error: uneven batch counts .*rank 1: 3 batches; rank 0: 4 batches"]),
    "tracker_hang": (0, [r"wandb online init did not finish within 4 s; retrying offline",
                         r"rank 0 of 2: .*tracker offline"]),
    "long_tmpdir:rank=1": (0, [
        r"environment: TMPDIR=\S+ \(socket paths under the old TMPDIR would be \d+ bytes, "
        r"over the AF_UNIX limit"]),
}


@pytest.mark.timeout(90)
@pytest.mark.parametrize("spec", list(INJECTIONS))
def test_each_injection_is_caught(tmp_path, spec):
    from conftest import mpiexec

    from hangkit.launcher import free_port

    code, patterns = INJECTIONS[spec]
    data, config = tmp_path / "data.npz", tmp_path / "config.yaml"
    subprocess.run([sys.executable, str(EXAMPLES / "make_data.py"), "--out", str(data),
                    "--samples", "256"], check=True, capture_output=True, timeout=60)
    config.write_text(INJECT_CONFIG)
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), HOME=str(tmp_path),
               WANDB_DIR=str(tmp_path))
    wandb = [] if spec.startswith("tracker_hang") else ["--no_wandb"]
    started = time.monotonic()
    done = subprocess.run([mpiexec(), "-n", "2", sys.executable, str(EXAMPLES / "train.py"),
                           "--config", str(config), "--datafile", str(data), *wandb,
                           "--inject", spec],
                          capture_output=True, text=True, timeout=80, env=env, cwd=tmp_path)
    seconds = time.monotonic() - started
    out = done.stdout + done.stderr
    assert f"injecting {spec.split(':')[0]} on rank" in out
    assert (done.returncode != 0) == bool(code), out[-4000:]
    for pattern in patterns:
        assert re.search(pattern, out), f"{pattern!r} not in:\n{out[-4000:]}"
    if code == 0:  # trained to the end on both ranks
        assert len(re.findall(r"rank \d of 2: \d+ steps", done.stdout)) == 2, out[-4000:]
    # Caught at the deadlines of INJECT_CONFIG (4-6 s), not a collective's 30-minute timeout.
    assert seconds < 45, f"{spec} took {seconds:.0f} s"


def test_a_bad_inject_spec_is_one_line(tmp_path):
    done = subprocess.run([sys.executable, str(EXAMPLES / "train.py"), "--config",
                           str(EXAMPLES / "config.yaml"), "--datafile", "x.npz",
                           "--inject", "worker_stuck:rank=x"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip() == ("train: error: --inject 'worker_stuck:rank=x': 'rank=x' is "
                                   "not rank=N or step=N (N a whole number >= 0)")


def test_cluster_polaris_without_a_gpu_is_one_line(tmp_path):
    data = tmp_path / "data.npz"
    subprocess.run([sys.executable, str(EXAMPLES / "make_data.py"), "--out", str(data),
                    "--samples", "64"], check=True, capture_output=True, timeout=60)
    done = subprocess.run([sys.executable, str(EXAMPLES / "train.py"), "--config",
                           str(EXAMPLES / "config.yaml"), "--datafile", str(data),
                           "--cluster", "polaris", "--no_wandb"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        "train: error: --cluster polaris needs GPUs, and torch sees none here (use --cluster "
        "local)")
