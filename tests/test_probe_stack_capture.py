"""The doctor's stack_capture probe with the real py-spy: a dump of a blocked child, a py-spy
that is missing, and a py-spy that ptrace refuses."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import psutil
import pytest

from hangkit.probes.runner import run_doctor
from hangkit.probes.stack_capture import KNOWN_FUNCTION, has_cap_sys_ptrace, ptrace_scope
from hangkit.pyspy import PY_SPY_ENV


def stack_result():
    (result,) = run_doctor("stack_capture", timeout=30)
    return result


def test_py_spy_dumps_a_blocked_child_here(monkeypatch):
    monkeypatch.delenv(PY_SPY_ENV, raising=False)
    result = stack_result()
    scope, cap = ptrace_scope(), has_cap_sys_ptrace()
    if scope not in (None, 0) and not cap:
        # A sibling may not trace at scope 1 or more without CAP_SYS_PTRACE: the probe must
        # say so rather than pass.
        assert result.status == "fail" and "ptrace" in result.advice, result
        return
    if scope in (None, 0):
        assert result.status == "ok", result
        assert result.detail.startswith(f"native dump found {KNOWN_FUNCTION} in "), result
    else:  # it works, but only through privileges a job may lack
        assert result.status == "warn" and "only" in result.detail, result
    assert result.data["native"] is True
    assert os.access(result.data["py_spy"], os.X_OK)
    assert result.data["py_spy_version"].startswith("py-spy ")
    assert result.data["ptrace_scope"] == scope


def test_a_missing_py_spy_fails_with_install_advice(monkeypatch, tmp_path):
    missing = tmp_path / "no-such-py-spy"
    monkeypatch.setenv(PY_SPY_ENV, str(missing))
    result = stack_result()
    assert result.status == "fail", result
    assert result.detail == f"py-spy from {PY_SPY_ENV} is not an executable file: {missing}"
    assert "pip install py-spy" in result.advice


def test_ptrace_denied_fails_with_ptrace_advice(monkeypatch, tmp_path):
    # A real denial: py-spy run as an unprivileged user may not attach to our processes.
    if not Path("/usr/bin/setpriv").exists() or psutil.Process().uids().effective != 0:
        pytest.skip("needs root and setpriv to run py-spy as another user")
    py_spy = shutil.which("py-spy", path=os.path.dirname(sys.executable)) or shutil.which(
        "py-spy")
    if py_spy is None:
        pytest.skip("py-spy not installed")
    wrapper = tmp_path / "py-spy-as-nobody"
    wrapper.write_text(f"#!/bin/sh\nexec setpriv --reuid=65534 --regid=65534 --clear-groups "
                       f"{py_spy} \"$@\"\n")
    wrapper.chmod(0o755)
    monkeypatch.setenv(PY_SPY_ENV, str(wrapper))
    result = stack_result()
    assert result.status == "fail", result
    assert result.detail.startswith("py-spy was refused ptrace on a test process"), result
    assert "CAP_SYS_PTRACE" in result.advice and "ptrace_scope" in result.advice
    assert result.data["native"] is False
