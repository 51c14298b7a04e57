"""The dataloader probe through the doctor's real runner: real DataLoader workers, broken for
real by a descriptor limit (DL-07: more workers fail, fewer work), a TMPDIR too long for their
sockets (DL-06: workers hang, in-process loading works) and a memory limit torch cannot load
under (even 0 workers fail); and the pure summary for outcomes a machine here cannot produce.
"""

from __future__ import annotations

import importlib.util

import pytest
from conftest import limited_doctor

from hangkit.probes.dataloader import summarise
from hangkit.probes.runner import run_doctor
from hangkit.records import ProbeResult

needs_torch = pytest.mark.skipif(importlib.util.find_spec("torch") is None,
                                 reason="needs torch")


def by_label(r: ProbeResult) -> dict[tuple[str, int], dict]:
    return {(t["method"], t["workers"]): t for t in r.data["tries"]}


@needs_torch
def test_every_worker_count_and_spawn_work():
    [r] = run_doctor(["dataloader"], timeout=30)  # as long as it needs, on a loaded machine
    assert r.status == "ok", r
    tries = by_label(r)
    assert set(tries) == {("fork", 0), ("fork", 1), ("fork", 2), ("fork", 4), ("spawn", 4)}
    assert all(t["ok"] is True and t["batches"] == 16 for t in tries.values()), tries
    assert r.data["largest_working"] == 4 and r.data["spawn_ok"] is True
    assert 0 < r.data["per_batch_seconds"] < 5
    assert r.detail.startswith("up to 4 workers work")


@needs_torch
def test_a_low_descriptor_limit_leaves_fewer_workers_working(monkeypatch):
    # ulimit -n 32: four fork workers' batches in flight need more descriptors than that.
    monkeypatch.setenv("HANGKIT_DOCTOR_WORKERS", "0,1,2,4")
    [r] = limited_doctor("dataloader", 20, "--nofile", "32")
    assert r.status == "warn", r
    tries = by_label(r)
    assert tries[("fork", 0)]["ok"] is True
    assert tries[("fork", 4)]["ok"] is False
    assert "Too many open files" in tries[("fork", 4)]["error"]
    best = r.data["largest_working"]
    assert best in (1, 2), tries
    assert f"num_workers={best} works" in r.detail
    assert f"DataLoader(num_workers={best})" in r.advice and "DL-07" in r.advice


@needs_torch
def test_a_tmpdir_too_long_for_worker_sockets_leaves_only_in_process_loading(
        tmp_path, monkeypatch):
    tmpdir = tmp_path / ("d" * max(120 - len(str(tmp_path)), 8))  # sockets under it: > 107 B
    tmpdir.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmpdir))
    monkeypatch.setenv("HANGKIT_DOCTOR_WORKERS", "0,2,4")
    monkeypatch.setenv("HANGKIT_DOCTOR_DATALOADER_TIMEOUT", "2")
    [r] = run_doctor(["dataloader"], timeout=14)
    assert r.status == "warn", r
    tries = by_label(r)
    assert tries[("fork", 0)]["ok"] is True
    # The worker's batch is dropped by its queue thread; DataLoader(timeout=...) ends the wait
    # (2 s, or less where the probe's deadline leaves less).
    hung = tries[("fork", 2)]
    assert hung["ok"] is False and hung["hung"] is True
    assert 0 < hung["timeout"] <= 2
    assert f"DataLoader timed out after {hung['timeout']:.1f} seconds" in hung["error"]
    assert "AF_UNIX path too long" in hung["cause"]
    assert tries[("fork", 4)]["ok"] is None  # not tried: the same hang, time saved for spawn
    assert tries[("spawn", 4)]["ok"] is False
    assert r.data["largest_working"] == 0
    assert "DataLoader(num_workers=0)" in r.advice and "DL-06" in r.advice


@needs_torch
def test_a_memory_limit_torch_cannot_load_under_fails_even_without_workers():
    [r] = limited_doctor("dataloader", 20, "--address-space", str(300 * 2**20))
    assert r.status == "fail", r
    assert r.detail.startswith("even num_workers=0 fails")
    assert "failed to map segment" in r.detail
    assert r.data["largest_working"] is None
    assert "ulimit -v" in r.advice


def _try(method: str, workers: int, ok: bool | None, error: str | None = None,
         cause: str | None = None) -> dict:
    return {"method": method, "workers": workers, "ok": ok, "error": error, "cause": cause,
            "per_batch_seconds": 0.002 if ok else None}


def test_summary_offers_spawn_when_fork_fails_at_the_largest_count_but_spawn_works():
    outcome = summarise([
        _try("fork", 0, True), _try("fork", 2, True),
        _try("fork", 4, False, "RuntimeError: DataLoader timed out after 10.0 seconds"),
        _try("spawn", 4, True)])
    assert outcome.status == "warn"
    assert outcome.detail.startswith("num_workers=4 fails (RuntimeError: DataLoader timed out")
    assert "DataLoader(num_workers=2)" in outcome.advice
    assert "multiprocessing_context='spawn'" in outcome.advice
    assert "DL-04" in outcome.advice


def test_summary_of_a_killed_worker_points_at_memory():
    outcome = summarise([
        _try("fork", 0, True),
        _try("fork", 4, False, "RuntimeError: DataLoader worker (pid 123) is killed by signal: "
             "Killed."),
        _try("spawn", 4, False, "RuntimeError: DataLoader worker (pid 456) is killed by "
             "signal: Killed.")])
    assert outcome.status == "warn"
    assert "DL-02" in outcome.advice and "DataLoader(num_workers=0)" in outcome.advice


@pytest.mark.parametrize("found", [
    {},  # a child killed before it reported
    {"ok": False, "error": "no time left after importing torch (9.8 s)"},  # its own report
    {"ok": False, "hung": True, "seconds": 3.0, "cause": None, "error": "did not finish"},
])
def test_every_try_has_the_documented_keys(found):
    from hangkit.probes.dataloader import TRY_KEYS, record

    try_ = record("fork", 2, **found)
    assert set(try_) == set(TRY_KEYS)
    assert try_["hung"] in (True, False) and (try_["method"], try_["workers"]) == ("fork", 2)
    assert summarise([record("fork", 0, ok=True, per_batch_seconds=0.001), try_]).status
