"""hangkit.training.trackers and hangkit.training.environment, with real wandb and real processes.

WJ-01 (wandb.init against a server that never answers), WJ-03 (offline chosen before the retry),
WJ-05 (progress bars on rank 0 only, plain lines in a batch log)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Client, Listener
from pathlib import Path

import psutil
import pytest
from conftest import PROGRAMS, TAG_VARIABLE, tagged_processes

from hangkit.deadline import DeadlineExceeded
from hangkit.training.trackers import TrackerTimeout, guarded

CHILDREN = PROGRAMS / "training_trackers"
ROOT = Path(__file__).parent.parent


class SilentServer:
    """Accepts connections and never answers: a W&B server behind a dead network path."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.sock.settimeout(0.2)
        self.conns: list[socket.socket] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}"

    def _accept(self):
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.conns.append(conn)

    def close(self):
        self.stop.set()
        self.thread.join(5)
        for conn in self.conns:
            conn.close()
        self.sock.close()


@pytest.fixture
def silent_server():
    server = SilentServer()
    yield server
    server.close()


def run_child(args: list[str], *, env: dict, timeout: float = 60,
              python: str = sys.executable) -> tuple[dict, str, float]:
    started = time.monotonic()
    done = subprocess.run([python, str(CHILDREN / "wandb_child.py"), *args], env=env,
                          capture_output=True, text=True, timeout=timeout)
    seconds = time.monotonic() - started
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
    assert lines, done.stdout[-2000:] + done.stderr[-2000:]
    return json.loads(lines[-1][len("RESULT "):]), done.stderr, seconds


def wandb_env(tmp_path: Path, server: SilentServer) -> dict:
    pytest.importorskip("wandb")
    wandb_dir = tmp_path / "wandb-dir"
    wandb_dir.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    return {**env, "WANDB_BASE_URL": server.url, "WANDB_API_KEY": "k" * 40,
            "WANDB_DIR": str(wandb_dir), "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config"),
            "WANDB_SILENT": "true", "HOME": str(tmp_path)}


def no_wandb_process_left() -> list[str]:
    tag = os.environ[TAG_VARIABLE]
    return [p.name() for p in tagged_processes(tag) if p.name().startswith("wandb")]


def test_wj01_online_init_hangs_falls_back_to_offline(tmp_path, silent_server):
    result, err, seconds = run_child(["--timeout", "5"], env=wandb_env(tmp_path, silent_server))
    assert result["mode"] == "offline", err[-2000:]
    assert "did not finish within 5 s" in result["reason"]
    assert "wandb online init did not finish within 5 s; retrying offline" in err
    assert "wandb sync" in err
    # The online try's deadline (5 s) plus the offline run, with a wide margin; not 90 s.
    assert result["init_seconds"] < 5 + 15, result
    assert result["failures"] == 0 and result["dropped"] == 1, result  # dropped: after finish
    assert result["finish_seconds"] < 10, result
    assert result["children"] == [], result  # finish leaves no wandb service behind
    assert list((tmp_path / "wandb-dir" / "wandb").glob("offline-run-*")), "no offline run"
    assert seconds < 45, f"child took {seconds:.1f} s to exit"
    assert no_wandb_process_left() == []


def test_wj03_offline_fails_too_gives_disabled_tracker(tmp_path, silent_server):
    # wandb rejects a run id with "/" in any mode: both tries fail for real.
    result, err, _ = run_child(["--timeout", "5", "--id", "bad/id"],
                               env=wandb_env(tmp_path, silent_server))
    assert result["mode"] == "disabled", err[-2000:]
    assert "wandb online init failed (UsageError" in err
    assert "wandb offline init failed too" in err and "tracking disabled" in err
    assert "offline: UsageError" in result["reason"]
    assert result["failures"] == 0
    assert no_wandb_process_left() == []


def test_rank_1_gets_a_no_op_tracker_without_importing_wandb(tmp_path, silent_server):
    env = {**wandb_env(tmp_path, silent_server), "PMI_RANK": "1", "PMI_SIZE": "4"}
    result, _, _ = run_child([], env=env)
    assert result["mode"] == "disabled" and "rank 1" in result["reason"]
    assert result["wandb_imported"] is False
    assert result["init_seconds"] < 1


def test_without_wandb_installed_the_tracker_is_disabled(tmp_path):
    base = getattr(sys, "_base_executable", None)
    if sys.prefix == sys.base_prefix or not base:
        pytest.skip("not in a virtualenv: no interpreter without wandb at hand")
    found = subprocess.run([base, "-c", "import wandb"], capture_output=True)
    if found.returncode == 0:
        pytest.skip(f"{base} has wandb too")
    deps = tmp_path / "deps"
    deps.mkdir()
    (deps / "psutil").symlink_to(Path(psutil.__file__).parent)
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{deps}"}
    result, err, _ = run_child(["--timeout", "5"], env=env, python=base)
    assert result["mode"] == "disabled"
    assert result["reason"] == "wandb is not installed"
    assert "wandb is not installed: tracking disabled" in err
    assert "ImportError" not in err and "Traceback" not in err


def test_guarded_raises_tracker_timeout_and_cleans_up():
    """guarded is hangkit.deadline.call (tested in test_deadline.py) with the tracker's error."""
    never = threading.Event()
    killed = []
    try:
        with pytest.raises(TrackerTimeout) as caught:
            guarded(never.wait, timeout=0.2, name="blocking init",
                    on_timeout=lambda: killed.append(True))
    finally:
        never.set()
    assert isinstance(caught.value, DeadlineExceeded) and isinstance(caught.value, TimeoutError)
    assert str(caught.value) == "blocking init did not finish within 0.2 s"
    assert "WANDB_MODE=offline" in caught.value.hint
    assert killed == [True]
    assert guarded(lambda: 42, timeout=5, name="quick") == 42


def run_progress(env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(CHILDREN / "progress_child.py")],
                          capture_output=True, text=True, timeout=30, env=env)


def test_wj05_progress_bar_draws_nothing_on_rank_1():
    done = run_progress({**os.environ, "PMI_RANK": "1", "PMI_SIZE": "4"})
    assert done.returncode == 0, done.stderr
    assert done.stdout == "DONE\n"
    assert done.stderr == ""


def test_wj05_progress_bar_on_rank_0_without_terminal_prints_plain_lines():
    done = run_progress({**os.environ, "PMI_RANK": "0", "PMI_SIZE": "4"})
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    assert "\r" not in done.stderr  # no redrawn bar in a batch log
    assert lines[0].startswith("epoch: 1/5 (20%)"), lines
    assert lines[-1].startswith("epoch: 5/5 (100%)") and lines[-1].endswith("done"), lines


def test_setup_environment_shortens_a_long_tmpdir(tmp_path):
    long_dir = tmp_path / ("d" * 110)
    long_dir.mkdir()
    code = (
        "import json, os, tempfile\n"
        "from multiprocessing.connection import Listener, Client\n"
        "from hangkit.training.environment import setup_environment\n"
        "changes = setup_environment()\n"
        "with Listener(family='AF_UNIX') as listener:\n"
        "    address = listener.address\n"
        "print(json.dumps({'changes': changes, 'tmpdir': os.environ['TMPDIR'],\n"
        "                  'tempdir': tempfile.gettempdir(), 'address': address,\n"
        "                  'exists': os.path.isdir(os.environ['TMPDIR'])}))\n")
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONUNBUFFERED", "OMP_NUM_THREADS", "WANDB_SILENT")}
    env["TMPDIR"] = str(long_dir)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=30, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout)
    assert out["tmpdir"].startswith("/tmp/hk-") and out["tempdir"] == out["tmpdir"]
    assert out["address"].startswith(out["tmpdir"])
    assert any(c.startswith("TMPDIR=/tmp/hk-") and "AF_UNIX" in c for c in out["changes"])
    assert "PYTHONUNBUFFERED=1 (output reaches the log as it happens)" in out["changes"]
    assert any(c.startswith("OMP_NUM_THREADS=1") for c in out["changes"])
    assert "WANDB_SILENT=true" in out["changes"]
    assert not os.path.exists(out["tmpdir"]), "the created TMPDIR outlived the process"


def test_setup_environment_in_this_process(monkeypatch, tmp_path):
    import tempfile

    from hangkit.training.environment import setup_environment

    long_dir = tmp_path / ("e" * 110)
    long_dir.mkdir()
    monkeypatch.setenv("TMPDIR", str(long_dir))
    monkeypatch.setenv("PYTHONUNBUFFERED", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setattr(tempfile, "tempdir", None)
    changes = setup_environment()
    assert len(changes) == 1 and changes[0].startswith("TMPDIR=/tmp/hk-"), changes
    assert os.environ["OMP_NUM_THREADS"] == "4"  # set by the user: kept
    assert tempfile.gettempdir() == os.environ["TMPDIR"]
    # multiprocessing's sockets now fit: a real Listener binds and a Client connects.
    with Listener(family="AF_UNIX") as listener, Client(listener.address):
        pass
    assert setup_environment() == []  # a second call changes nothing


def test_a_hung_wandb_import_gives_disabled_tracker_within_the_deadline():
    hung = CHILDREN / "hung_wandb"
    env = {**os.environ, "PYTHONPATH": f"{hung}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    result, err, seconds = run_child(["--timeout", "2"], env=env)
    assert result["mode"] == "disabled", err[-2000:]
    assert "import wandb did not finish within 2 s" in result["reason"]
    assert "tracking disabled" in err
    assert result["abandoned"] == ["import wandb"]  # the stuck thread, accounted for
    assert result["init_seconds"] < 2 + 5, result
    assert seconds < 20  # a daemon thread stuck in an import does not hold up the exit


class StuckRun:
    """A wandb run whose calls never return (a service that stopped answering)."""

    def __init__(self):
        self.release = threading.Event()
        self.logged = []

    def log(self, data, **kwargs):
        self.logged.append(data)
        self.release.wait()

    def finish(self):
        self.release.wait()


def test_log_and_finish_never_block_on_a_stuck_run():
    from hangkit.training.trackers import Tracker

    run = StuckRun()
    tracker = Tracker("online", run=run)
    started = time.monotonic()
    for step in range(20_000):  # more than the queue holds: the rest are dropped, counted
        tracker.log({"step": step})
    assert time.monotonic() - started < 5
    assert tracker.dropped > 0
    started = time.monotonic()
    tracker.finish(timeout=1.0)
    assert time.monotonic() - started < 1.0 + 5
    assert tracker.finished
    tracker.log({"after": 1})  # never raises
    run.release.set()  # let the abandoned threads end before the next test


def test_a_disabled_tracker_is_a_no_op():
    from hangkit.training.trackers import disabled

    with disabled("testing") as tracker:
        tracker.log({"loss": 1.0})
    assert tracker.mode == "disabled" and not tracker.enabled and tracker.failures == 0
