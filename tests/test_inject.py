"""An agent in every rank with no change to its code (hangkit/bootstrap.py, hangkit/inject.py):
plain programs, none of which imports hangkit, under `hangkit watch`."""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import PROGRAMS, mpiexec
from test_watch_hangs import HANG

from hangkit.bootstrap import python_program
from hangkit.inject import HOOK_PREFIX, inject_environment, remove_hook

INJECT = PROGRAMS / "inject"
SIDECAR = "hangkit-sidecar"


def hooks() -> set[str]:
    return set(glob.glob(os.path.join(os.environ.get("TMPDIR", "/tmp"), HOOK_PREFIX + "*")))


def python313() -> str:
    found = sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.13*/bin/python3.13")))
    path = found[-1] if found else shutil.which("python3.13")
    if not path:
        pytest.skip("no Python 3.13 here (pyenv has one on the project's machines)")
    return path


@pytest.mark.parametrize(("argv", "expected"), [
    (["python", "train.py", "--lr", "1"], ("script", "train.py")),
    (["python", "-u", "-X", "faulthandler", "/a/torchrun_train.py"],
     ("script", "torchrun_train.py")),
    (["python", "-m", "torch.distributed.run", "x.py"], ("-m", "torch.distributed.run")),
    (["python", "-Bm", "accelerate.commands.launch"], ("-m", "accelerate.commands.launch")),
    (["python", "-Wignore", "-mpkg.mod"], ("-m", "pkg.mod")),
    (["python", "-B", "-c", "from multiprocessing.spawn import spawn_main"], ("-c", None)),
    (["python", "-uc", "pass"], ("-c", None)),
    (["python", "-W", "ignore", "-"], (None, None)),
    (["python"], (None, None)),
])
def test_the_program_an_interpreter_runs_is_read_from_its_argv(argv, expected):
    assert python_program(argv) == expected


def test_hook_directory_is_private_and_replaces_an_outer_one(tmp_path):
    env, hook = inject_environment({"PYTHONPATH": f"{tmp_path}"})
    try:
        assert os.stat(hook).st_mode & 0o777 == 0o700
        assert os.stat(Path(hook, "sitecustomize.py")).st_mode & 0o777 == 0o600
        assert env["PYTHONPATH"].split(os.pathsep) == [hook, str(tmp_path)]
        inner, inner_hook = inject_environment(env)  # a shim's, under watch's
        assert inner["PYTHONPATH"].split(os.pathsep) == [inner_hook, str(tmp_path)]
        remove_hook(inner_hook)
        off, none = inject_environment(env, on=False)
        assert none is None and off["PYTHONPATH"] == str(tmp_path)
        assert off["HANGKIT_INJECT"] == "off"
    finally:
        remove_hook(hook)
    assert not os.path.exists(hook)


@pytest.mark.timeout(120)
def test_users_own_sitecustomize_still_runs_and_sees_its_own_path(run_watch, tmp_path):
    site = tmp_path / "usersite"
    site.mkdir()
    shutil.copy(INJECT / "user_sitecustomize.py", site / "sitecustomize.py")
    mark = tmp_path / "mark"
    before = hooks()
    run = run_watch([sys.executable, str(INJECT / "site_checks.py")],
                    options=["--timeout", "60"], timeout=100,
                    env={"PYTHONPATH": str(site), "USER_SITECUSTOMIZE_MARK": str(mark),
                         "RANK": "0", "WORLD_SIZE": "1"})
    assert run.returncode == 0, run.err
    seen = json.loads(run.stdout.decode().strip().splitlines()[-1])
    assert seen["sitecustomize"] == str(site / "sitecustomize.py")
    assert not seen["hook_on_path"]
    assert SIDECAR in seen["threads"]  # a rank (RANK is set): its agent runs
    assert mark.read_text().startswith("ran in ")
    assert "hangkit:" not in run.err.replace("hangkit: set ", "")
    assert hooks() == before  # watch removed its hook directory


@pytest.mark.timeout(60)
def test_a_failure_in_the_hook_is_one_line_and_the_program_runs_on(tmp_path):
    env, hook = inject_environment(dict(os.environ))
    env.update({"HANGKIT_MONITOR": "not an address", "HANGKIT_MONITOR_KEY": "k", "RANK": "0"})
    try:
        done = subprocess.run([sys.executable, str(INJECT / "site_checks.py")],
                              capture_output=True, text=True, env=env, timeout=50)
    finally:
        remove_hook(hook)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["threads"] == ["MainThread"]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hangkit: no agent in this rank"), lines
    assert "not an address" in lines[0]


@pytest.mark.timeout(120)
def test_ranks_on_another_python_get_stacks_and_the_report_says_why_no_agent(run_watch):
    """Ranks on Python 3.13 (no pyzmq there) under a watch on this Python."""
    run = run_watch([mpiexec(), "-n", "2", python313(), str(INJECT / "plain_rank.py")],
                    options=["--timeout", "3", "--grace", "2"], timeout=100)
    assert run.returncode == HANG, run.err
    ranks = {p["rank"]: p for p in run.report["processes"] if p["role"] == "rank"}
    assert sorted(ranks) == [0, 1]
    for p in ranks.values():
        assert p["stacks_from"] == "py-spy", p
        assert any(f["function"] == "wait_for_peer" for t in p["threads"] for f in t["frames"])
        assert "cannot import hangkit's agent" in p["no_agent"], p
        assert "Python 3.13" in p["no_agent"] and "zmq" in p["no_agent"]
    assert run.report["ranks"] == []  # no agent ever beat


@pytest.mark.timeout(120)
def test_no_inject_leaves_the_ranks_alone_and_the_report_says_so(run_watch):
    run = run_watch([mpiexec(), "-n", "2", sys.executable, str(INJECT / "plain_rank.py")],
                    options=["--timeout", "3", "--grace", "2", "--no-inject"], timeout=100)
    assert run.returncode == HANG, run.err
    report = run.report
    assert report["context"]["agents"].startswith("off (--no-inject)")
    ranks = [p for p in report["processes"] if p["role"] == "rank"]
    assert len(ranks) == 2 and report["ranks"] == []
    for p in ranks:
        assert p["stacks_from"] == "py-spy"
        assert p["no_agent"] == "injection was off (--no-inject)"


@pytest.mark.timeout(180)
def test_dataloader_workers_compile_workers_and_helpers_start_no_agent(run_watch, tmp_path):
    """One rank (mpiexec's variables, which every helper inherits) with spawned DataLoader
    workers, torch.compile's worker pool, a `python -c` helper and a helper script."""
    run = run_watch([mpiexec(), "-n", "1", sys.executable, str(INJECT / "spawns_helpers.py")],
                    options=["--timeout", "3", "--grace", "2"], timeout=160,
                    env={"TORCHINDUCTOR_COMPILE_THREADS": "2", "TMPDIR": str(tmp_path)})
    assert run.returncode == HANG, run.err
    started = json.loads(next(line for line in run.stdout.decode().splitlines()
                              if line.startswith("{")))
    report = run.report
    assert [(r["rank"], r["pid"]) for r in report["ranks"]] == [(0, started["pid"])]
    processes = {p["pid"]: p for p in report["processes"]}
    helpers = set(started["children"]) & set(processes)
    assert len(helpers) >= 5, processes  # tracker, 2 workers, 2 helpers, compile workers
    kinds = {processes[pid]["cmdline"][-1] for pid in helpers}
    assert any("compile_worker" in " ".join(processes[pid]["cmdline"]) for pid in helpers)
    assert "child" in kinds
    for pid in helpers:
        p = processes[pid]
        assert p["role"] in ("other", "dataloader-worker"), p
        assert SIDECAR not in [t["name"] for t in p["threads"]], p["cmdline"]
    assert processes[started["pid"]]["stacks_from"] == "agent"


@pytest.mark.parametrize(("cmdline", "launcher"), [
    (["/v/bin/python", "/v/bin/torchrun", "--nproc-per-node", "4", "train.py"], True),
    (["/v/bin/python", "-m", "torch.distributed.run", "train.py"], True),
    (["/v/bin/python", "/v/bin/accelerate", "launch", "train.py"], True),
    (["/v/bin/python", "-u", "/home/me/torchrun_train.py"], False),  # a rank's script
    (["/v/bin/python", "-m", "hangkit.demo.train"], False),
    (["/v/bin/python", "-m", "hangkit", "rank", "--", "python", "x.py"], True),
    (["mpiexec", "-n", "2", "python", "x.py"], True),
])
def test_launchers_are_known_by_the_program_they_run_not_a_substring(cmdline, launcher):
    from hangkit.monitor.roles import is_launcher

    assert is_launcher(cmdline) is launcher


@pytest.mark.timeout(120)
def test_a_rank_without_an_agent_is_asked_through_torchs_nccl_debug_pipe(run_watch, tmp_path):
    """NCCL's watchdog imitated (no GPU here: see the program): the capture writes to the pipe
    watch named, reads the dump the watchdog writes, and watch removes the pipe at the end."""
    run = run_watch([sys.executable, str(PROGRAMS / "nccl_watchdog_rank.py")],
                    options=["--timeout", "3", "--grace", "2", "--no-inject"], timeout=100,
                    env={"RANK": "0", "TORCH_FR_DUMP_TEMP_FILE": str(tmp_path / "trace_")})
    assert run.returncode == HANG, run.err
    pipe = next(line.split(": ", 1)[1] for line in run.stdout.decode().splitlines()
                if line.startswith("ready: "))
    assert pipe.startswith("/tmp/hk-") and pipe.endswith("-nccl-rank0.pipe")
    (rank,) = [p for p in run.report["processes"] if p["role"] == "rank"]
    recording = rank["recording"]
    assert recording["source"].startswith("torch's NCCL watchdog"), recording
    ops = [e["profiling_name"] for e in recording["dump"]["entries"]]
    assert ops == ["nccl:all_reduce"] * 3
    assert not os.path.exists(pipe)


@pytest.mark.parametrize(("env", "rank", "size"), [
    ({"PMI_RANK": "1", "PMI_SIZE": "2"}, 1, 2),
    # A job script's own WORLD_SIZE does not stand over the launcher's (mpiexec -n 2).
    ({"PMI_RANK": "1", "PMI_SIZE": "2", "WORLD_SIZE": "3"}, 1, 2),
    # torchrun under mpiexec (one agent a node): torchrun's numbers are the rank's.
    ({"PMI_RANK": "1", "PMI_SIZE": "2", "RANK": "5", "WORLD_SIZE": "8",
      "TORCHELASTIC_RUN_ID": "j"}, 5, 8),
    ({"SLURM_PROCID": "3", "SLURM_NTASKS": "4"}, 3, 4),
    # Lightning's spawned ranks on its first node: LOCAL_RANK and NODE_RANK only.
    ({"LOCAL_RANK": "2", "NODE_RANK": "0", "WORLD_SIZE": "3"}, 2, 3),
    ({"LOCAL_RANK": "2", "NODE_RANK": "1"}, None, None),
])
def test_rank_numbers_come_from_the_innermost_launcher(env, rank, size):
    from hangkit.rankenv import rank_from_environ, world_size_from_environ

    assert (rank_from_environ(env), world_size_from_environ(env)) == (rank, size)
