"""The imports probe through the doctor's real runner: real imports in real children, a module
that never finishes importing, one that raises, and torch under a memory limit it cannot load in.
"""

from __future__ import annotations

import importlib.util
import os
import time
from importlib.metadata import version
from pathlib import Path

import pytest
from conftest import limited_doctor

from hangkit.probes.runner import run_doctor

HELPERS = Path(__file__).parent / "programs" / "probes"

needs_torch_and_mpi4py = pytest.mark.skipif(
    importlib.util.find_spec("torch") is None or importlib.util.find_spec("mpi4py") is None,
    reason="needs torch and mpi4py (the dev extra)")


def add_imports(monkeypatch, names: str) -> None:
    """Puts the helper modules on the children's path and names them to the probe."""
    path = os.environ.get("PYTHONPATH")
    monkeypatch.setenv("PYTHONPATH", str(HELPERS) + (os.pathsep + path if path else ""))
    monkeypatch.setenv("HANGKIT_DOCTOR_IMPORTS", names)


@needs_torch_and_mpi4py
def test_default_modules_import_and_report_version_and_time():
    [r] = run_doctor(["imports"], timeout=20)
    assert r.status == "ok", r
    torch = r.data["modules"]["torch"]
    assert torch["status"] == "ok"
    assert torch["version"] == version("torch")
    assert 0 < torch["seconds"] < 20
    mpi = r.data["modules"]["mpi4py"]
    assert mpi["status"] == "ok" and mpi["version"] == version("mpi4py")
    assert "MPI" in mpi["mpi_library"]  # the library's own banner, read without MPI_Init
    assert f"torch {version('torch')}" in r.detail


@needs_torch_and_mpi4py
def test_import_that_never_returns_times_out_naming_it_while_the_rest_report(monkeypatch):
    add_imports(monkeypatch, "hangkit_probe_never_imports")
    started = time.monotonic()
    [r] = run_doctor(["imports"], timeout=10)
    assert time.monotonic() - started < 20
    assert r.status == "timeout", r
    assert "import hangkit_probe_never_imports did not finish within" in r.detail
    assert "py-spy dump" in r.advice
    # The probe reported (data and all) before the doctor's deadline: only the import was killed.
    modules = r.data["modules"]
    assert modules["hangkit_probe_never_imports"]["status"] == "timeout"
    assert modules["torch"]["status"] == "ok" and modules["mpi4py"]["status"] == "ok"
    assert r.seconds < 10


@needs_torch_and_mpi4py
def test_import_that_raises_fails_with_its_error(monkeypatch):
    add_imports(monkeypatch, "hangkit_probe_import_raises")
    [r] = run_doctor(["imports"], timeout=20)
    assert r.status == "fail", r
    assert ("import hangkit_probe_import_raises failed: ImportError: libhangkit_probe.so.3: "
            "cannot open shared object file") in r.detail
    assert r.data["modules"]["hangkit_probe_import_raises"]["status"] == "fail"
    assert r.data["modules"]["torch"]["status"] == "ok"


@needs_torch_and_mpi4py
def test_slow_imports_warn_with_the_shared_filesystem_advice(monkeypatch):
    # A threshold torch's real import is always over: the same path as a 10 s import on Lustre.
    monkeypatch.setenv("HANGKIT_DOCTOR_SLOW_IMPORT", "0.001")
    [r] = run_doctor(["imports"], timeout=20)
    assert r.status == "warn", r
    assert "import torch took" in r.detail
    assert r.data["modules"]["torch"]["status"] == "slow"
    assert "/dev/shm" in r.advice and "/local/scratch" in r.advice


@needs_torch_and_mpi4py
def test_torch_that_cannot_load_under_a_memory_limit_fails_with_the_last_line():
    # ulimit -v 300 MB, as a job's memory limit would: libtorch cannot even be mapped.
    [r] = limited_doctor("imports", 20, "--address-space", str(300 * 2**20))
    assert r.status == "fail", r
    assert "import torch failed: ImportError:" in r.detail
    assert "failed to map segment" in r.detail
    assert r.data["modules"]["torch"]["status"] == "fail"


def test_a_bad_module_name_is_reported_not_run(monkeypatch):
    monkeypatch.setenv("HANGKIT_DOCTOR_IMPORTS", "numpy,not-a-module;rm")
    [r] = run_doctor(["imports"], timeout=20)
    assert r.status == "fail"
    assert "'not-a-module;rm'" in r.detail and "HANGKIT_DOCTOR_IMPORTS" in r.advice
