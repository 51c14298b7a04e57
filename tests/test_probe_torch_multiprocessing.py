"""The torch_multiprocessing probe through the doctor's real runner: real tensors through real
queues, broken for real by a descriptor limit (DL-07) and by a TMPDIR too long for AF_UNIX
sockets (DL-06); and the pure summary for the combinations a machine here cannot produce.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from conftest import limited_doctor

from hangkit.probes.runner import run_doctor
from hangkit.probes.torch_multiprocessing import summarise

COMBINATIONS = {"fork+file_descriptor", "fork+file_system", "spawn+file_descriptor",
                "spawn+file_system"}

needs_torch = pytest.mark.skipif(importlib.util.find_spec("torch") is None,
                                 reason="needs torch")


@needs_torch
def test_all_four_combinations_carry_tensors_both_ways():
    before = set(Path("/dev/shm").glob("torch_*"))
    [r] = run_doctor(["torch_multiprocessing"], timeout=30)  # on a loaded machine too
    # The probe leaves /dev/shm as it found it (file_system's segments are named files).
    assert not set(Path("/dev/shm").glob("torch_*")) - before
    assert r.status == "ok", r
    tries = r.data["tries"]
    assert set(tries) == COMBINATIONS
    for name, t in tries.items():
        assert t["ok"] is True, (name, t)
        assert 0 < t["seconds"] < 20
        assert f"{name} {t['seconds']:.1f} s" in r.detail


@needs_torch
def test_a_low_descriptor_limit_fails_the_default_and_names_file_system():
    # ulimit -n 32: file_descriptor holds a descriptor per tensor in flight, file_system none.
    [r] = limited_doctor("torch_multiprocessing", 15, "--nofile", "32")
    assert r.status == "fail", r
    tries = r.data["tries"]
    assert tries["fork+file_descriptor"]["ok"] is False
    assert "Too many open files" in tries["fork+file_descriptor"]["cause"]
    assert tries["fork+file_system"]["ok"] is True
    assert r.detail.startswith("fork+file_descriptor (training's default) does not work")
    assert "DL-07" in r.advice
    assert "set_sharing_strategy('file_system')" in r.advice


@needs_torch
def test_a_tmpdir_too_long_for_af_unix_fails_every_combination(tmp_path, monkeypatch):
    tmpdir = tmp_path / ("d" * max(120 - len(str(tmp_path)), 8))  # sockets under it: > 107 B
    tmpdir.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmpdir))
    [r] = run_doctor(["torch_multiprocessing"], timeout=12)
    assert r.status == "fail", r
    tries = r.data["tries"]
    assert set(tries) == COMBINATIONS and not r.data["working"]
    assert "AF_UNIX path too long" in tries["fork+file_descriptor"]["cause"]
    assert "torch_shm_manager" in tries["fork+file_system"]["cause"]
    assert "DL-06" in r.advice and "TMPDIR=/tmp" in r.advice
    assert "file_system does not help" in r.advice


def _try(ok: bool, error: str | None = None, cause: str | None = None) -> dict:
    return {"ok": ok, "seconds": 0.5, "error": error, "cause": cause}


def test_summary_warns_when_only_spawn_fails_and_keeps_the_defaults():
    broken = _try(False, "no tensors came back within 9.0 s",
                  "AttributeError: Can't get attribute 'echo' on <module '__main__'>")
    outcome = summarise({"fork+file_descriptor": _try(True), "fork+file_system": _try(True),
                         "spawn+file_descriptor": broken, "spawn+file_system": broken})
    assert outcome.status == "warn"
    assert outcome.detail.startswith("spawn+file_descriptor, spawn+file_system does not work")
    assert "Training's default (fork+file_descriptor) works" in outcome.advice


def test_summary_names_spawn_when_only_fork_fails():
    hung = _try(False, "no tensors came back within 9.0 s")
    outcome = summarise({"fork+file_descriptor": hung, "fork+file_system": hung,
                         "spawn+file_descriptor": _try(True), "spawn+file_system": _try(True)})
    assert outcome.status == "fail"
    assert "multiprocessing_context='spawn'" in outcome.advice
