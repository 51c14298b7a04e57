"""`hangkit doctor`: the runner's deadlines, the table, the JSON, exit codes; and the probes
that read this machine (environment, af_unix, shm, filesystem, polaris), each made to pass and
made to warn, fail or time out for real."""

from __future__ import annotations

import json
import os
import time

import pytest

import hangkit
from hangkit.cli import main
from hangkit.probes import PROBE_NAMES
from hangkit.probes.runner import run_doctor


def one(results, name="", rank=None):
    (found,) = [r for r in results if (not name or r.name == name) and r.rank == rank]
    return found


# The runner


def test_a_probe_whose_process_hangs_is_a_timeout_and_costs_only_its_deadline():
    # A launcher that never starts the ranks (as a PALS mpiexec waiting for nodes would):
    # both probes' jobs hang; they run at once, so the doctor takes one deadline, not two.
    started = time.monotonic()
    results = run_doctor(["af_unix", "shm"], ranks=1, timeout=2,
                         launcher=["sh", "-c", "echo waiting for nodes >&2; exec sleep 600",
                                   "--"])
    wall = time.monotonic() - started
    assert [(r.name, r.rank, r.status) for r in results] == [
        ("af_unix", 0, "timeout"), ("shm", 0, "timeout")]
    assert results[0].detail == "did not finish within 2 s; last words: waiting for nodes"
    assert wall < 3.9, f"two hanging probes took {wall:.1f} s with a 2 s deadline"


def test_a_probe_whose_process_dies_is_a_failure_naming_the_signal():
    results = run_doctor(["af_unix"], ranks=2, timeout=10,
                         launcher=["sh", "-c", "echo out of memory >&2; kill -9 $$", "--"])
    assert [(r.rank, r.status) for r in results] == [(0, "fail"), (1, "fail")]
    assert results[0].detail.endswith("(killed by signal 9): out of memory")


def test_probes_run_on_every_rank(tmp_path):
    results = run_doctor(["af_unix", "filesystem"], ranks=2, timeout=20, path=tmp_path)
    assert [(r.name, r.rank, r.status) for r in results] == [
        ("af_unix", 0, "ok"), ("af_unix", 1, "ok"), ("filesystem", 0, "ok"),
        ("filesystem", 1, "ok")]


@pytest.mark.parametrize("argv, message", [
    (["--only", "af_unix,nope"], "unknown probe 'nope'"),
    (["--ranks", "0"], "--ranks must be at least 1, got 0"),
    (["--timeout", "0"], "--timeout must be a positive number of seconds, got 0"),
    (["--timeout", "-3"], "--timeout must be a positive number of seconds, got -3"),
    (["--path", "/no/such/dir"], "--path is not a directory: /no/such/dir"),
    (["--json", "/no/such/dir/out.json"], "--json: no such directory: /no/such/dir"),
])
def test_bad_usage_is_one_line_and_exit_2(argv, message, capsys):
    assert main(["doctor", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"hangkit: error: {message}" or (
        message in err and err.startswith("hangkit: error:") and "\n" not in err), err


@pytest.mark.parametrize("kwargs, message", [
    ({"timeout": -1}, "timeout must be a positive number of seconds, got -1"),
    ({"ranks": 0}, "ranks must be at least 1, got 0"),
    ({"path": "/no/such/dir"}, "path is not a directory: /no/such/dir"),
    ({"only": ","}, "only names no probe"),
])
def test_the_library_names_its_parameters_not_the_cli_options(kwargs, message):
    with pytest.raises(hangkit.UsageError) as caught:
        hangkit.doctor(**kwargs)
    assert str(caught.value) == message


def test_cli_table_json_and_exit_code(tmp_path, capsys, monkeypatch):
    long_dir = tmp_path / ("d" * 100)
    long_dir.mkdir()
    monkeypatch.setenv("TMPDIR", str(long_dir))
    out = tmp_path / "doctor.json"
    code = main(["doctor", "--only", "af_unix,filesystem", "--path", str(tmp_path),
                 "--timeout", "20", "--json", str(out)])
    printed = capsys.readouterr().out
    assert code == 1, printed
    assert printed.splitlines()[0].split() == ["probe", "result", "seconds", "detail"]
    assert "[FAIL] af_unix: cannot bind a multiprocessing socket" in printed
    assert "advice: Point TMPDIR at a short directory" in printed
    document = json.loads(out.read_text())
    assert [(p["name"], p["rank"], p["status"]) for p in document["probes"]] == [
        ("af_unix", None, "fail"), ("filesystem", None, "ok")]
    assert set(document["probes"][0]) >= {"name", "rank", "status", "seconds", "detail",
                                          "advice"}
    assert document["exit_code"] == 1 and document["ranks"] is None


def test_python_api_returns_the_same_records():
    import hangkit

    (result,) = hangkit.doctor(["af_unix"], timeout=20)
    assert isinstance(result, hangkit.ProbeResult)
    assert (result.name, result.rank, result.status) == ("af_unix", None, "ok")
    assert list(PROBE_NAMES)[:3] == ["environment", "af_unix", "shm"]


# The probes of this module


def test_environment_ok_when_set_up(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("PYTHONUNBUFFERED", "1")
    monkeypatch.setenv("WANDB_API_KEY", "0123456789abcdef")
    result = one(run_doctor(["environment"], timeout=40))
    assert result.status == "ok", result
    assert result.data["threads_at_fork"] == 1
    assert "0123456789abcdef" not in json.dumps(result.to_json())


def test_environment_warns_about_threads_and_buffering(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("PYTHONUNBUFFERED", raising=False)
    monkeypatch.setenv("NCCL_COLLNET_ENABLE", "1")
    result = one(run_doctor(["environment"], timeout=40))
    assert result.status == "warn", result
    for words in ("PYTHONUNBUFFERED is not 1", "OMP_NUM_THREADS is unset",
                  "NCCL_COLLNET_ENABLE=1 set"):
        assert words in result.detail
    if os.cpu_count() > 1:  # torch's pool has one thread per core
        assert "threads alive when a DataLoader would fork" in result.detail
        assert "DL-04" in result.advice


def test_af_unix_ok_and_fail_under_a_long_tmpdir(tmp_path, monkeypatch):
    assert one(run_doctor(["af_unix"], timeout=20)).status == "ok"
    long_dir = tmp_path / ("x" * 100)
    long_dir.mkdir()
    monkeypatch.setenv("TMPDIR", str(long_dir))
    result = one(run_doctor(["af_unix"], timeout=20))
    assert result.status == "fail" and "AF_UNIX path too long" in result.detail


def test_shm_against_the_workload(monkeypatch):
    result = one(run_doctor(["shm"], timeout=20))
    assert result.status == "ok" and result.data["free_mb"] > 0
    free = result.data["free_mb"]
    # Ranks x workers x prefetch x batch beyond what is free: a warning naming the figures.
    monkeypatch.setenv("PALS_LOCAL_SIZE", "4")
    monkeypatch.setenv("HANGKIT_DOCTOR_BATCH_MB", str(free / 8))
    result = one(run_doctor(["shm"], timeout=20))
    assert result.status == "warn" and result.data["need_mb"] > free, result
    assert "4 rank(s) x 4 workers x 2 batches" in result.detail
    monkeypatch.setenv("HANGKIT_DOCTOR_BATCH_MB", str(free * 2))
    assert one(run_doctor(["shm"], timeout=20)).status == "fail"


def test_filesystem_ok_then_stalled_on_a_fifo(tmp_path):
    (tmp_path / "data-000.bin").write_bytes(b"x" * 10000)
    result = one(run_doctor(["filesystem"], timeout=20, path=tmp_path))
    assert result.status == "ok" and {"write", "fsync", "read", "stat", "listdir",
                                      "open"} <= set(result.data), result
    # A file whose open never returns, as on a hung shared filesystem.
    os.mkfifo(tmp_path / "data-001.bin")
    started = time.monotonic()
    result = one(run_doctor(["filesystem"], timeout=6, path=tmp_path))
    assert result.status == "timeout", result
    assert result.detail.startswith(f"open {tmp_path / 'data-001.bin'} did not return within")
    assert "DL-01" in result.advice and time.monotonic() - started < 6 + 3


def test_polaris_skipped_outside_pbs_then_checks_a_fake_job(tmp_path, monkeypatch):
    monkeypatch.delenv("PBS_JOBID", raising=False)
    assert one(run_doctor(["polaris"], timeout=20)).status == "skipped"
    # PBS cannot run here: a job's variables and node file stand in for one.
    nodefile = tmp_path / "nodefile"
    nodefile.write_text("x3001c0s13b0n0\nx3001c0s13b1n0\n")
    monkeypatch.setenv("PBS_JOBID", "123456.polaris-pbs-01")
    monkeypatch.setenv("PBS_NODEFILE", str(nodefile))
    monkeypatch.setenv("https_proxy", "http://proxy.alcf.anl.gov:3128")
    monkeypatch.setenv("PALS_LOCAL_SIZE", "1")  # one rank, no workers: fits any machine
    monkeypatch.setenv("HANGKIT_DOCTOR_WORKERS", "0")
    result = one(run_doctor(["polaris"], timeout=20))
    assert result.status == "ok", result
    assert "job 123456.polaris-pbs-01 on 2 node(s), first x3001c0s13b0n0" in result.detail
    monkeypatch.setenv("PALS_LOCAL_SIZE", "8")
    monkeypatch.delenv("https_proxy")
    monkeypatch.delenv("HTTPS_PROXY", raising=False)
    result = one(run_doctor(["polaris"], timeout=20))
    assert result.status == "warn"
    for words in ("8 ranks per node share", "no proxy variables", "8 ranks x (1 + 0 DataLoader"):
        assert words in result.detail
    monkeypatch.setenv("PBS_NODEFILE", str(tmp_path / "missing"))
    assert one(run_doctor(["polaris"], timeout=20)).status == "fail"


def test_every_registered_probe_has_a_module():
    from importlib.util import find_spec

    from hangkit.probes import REGISTRY

    assert [n for n, m in REGISTRY.items() if find_spec(m) is None] == []
