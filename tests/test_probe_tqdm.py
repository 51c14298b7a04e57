"""The doctor's tqdm probe against the real tqdm: its lock in a fresh process and after a fork,
and whether bars would be drawn on every rank. Needs tqdm (the dev extra)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from conftest import doctor_where_missing

from hangkit.probes.runner import run_doctor
from hangkit.rankenv import RANK_VARIABLES, SIZE_VARIABLES


@pytest.fixture
def one_process(monkeypatch):
    """No launcher variables and no TQDM_* settings in the doctor's children."""
    for name in (*RANK_VARIABLES, *SIZE_VARIABLES):
        monkeypatch.delenv(name, raising=False)
    for name in [n for n in os.environ if n.startswith("TQDM_")]:
        monkeypatch.delenv(name)


def tqdm_result(**kwargs):
    results = run_doctor("tqdm", timeout=30, **kwargs)
    return results[0] if len(results) == 1 else results


def test_skipped_where_tqdm_is_not_installed(tmp_path):
    result = doctor_where_missing("tqdm", "tqdm", tmp_path)
    assert (result["status"], result["detail"]) == ("skipped", "tqdm is not installed"), result


def test_one_process_passes_with_the_lock_free_also_after_fork(one_process):
    tqdm = pytest.importorskip("tqdm")
    result = tqdm_result()
    assert result.status == "ok", result
    assert result.detail.startswith("one process; ")
    assert "lock free, also after fork" in result.detail
    assert result.data["tqdm_version"] == tqdm.__version__
    assert result.data["bars_disabled"] is False


def test_a_non_zero_rank_under_mpi_warns_that_every_rank_draws_bars(one_process, monkeypatch):
    pytest.importorskip("tqdm")
    monkeypatch.setenv("PMI_SIZE", "4")
    monkeypatch.setenv("PMI_RANK", "1")
    result = tqdm_result()
    assert result.status == "warn", result
    assert "would be drawn on rank 1 of 4" in result.detail
    assert "WJ-05" in result.advice and "disable=rank != 0" in result.advice
    assert "TQDM_DISABLE=1" in result.advice and "mininterval" in result.advice


def test_rank_zero_draws_the_bars_and_passes(one_process, monkeypatch):
    pytest.importorskip("tqdm")
    monkeypatch.setenv("PMI_SIZE", "4")
    monkeypatch.setenv("PMI_RANK", "0")
    assert tqdm_result().status == "ok"


def test_tqdm_disable_on_the_other_ranks_silences_the_warning(one_process, monkeypatch):
    # The probe asks a real bar: tqdm >= 4.66 takes TQDM_* variables as argument defaults.
    tqdm = pytest.importorskip("tqdm")
    if tuple(int(x) for x in tqdm.__version__.split(".")[:2]) < (4, 66):
        pytest.skip(f"tqdm {tqdm.__version__} does not read TQDM_DISABLE")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("TQDM_DISABLE", "1")
    result = tqdm_result()
    assert result.status == "ok", result
    assert result.detail.startswith("bars disabled here by the environment")
    assert result.data["bars_disabled"] is True


def test_under_mpiexec_only_the_non_zero_ranks_warn(one_process):
    pytest.importorskip("tqdm")
    if not Path(sys.executable).with_name("mpiexec").exists():
        pytest.skip("mpiexec not installed (the local-mpi extra)")
    results = tqdm_result(ranks=2)
    assert [(r.rank, r.status) for r in results] == [(0, "ok"), (1, "warn")], results
    assert "rank 1 of 2" in results[1].detail
