"""The safe DataLoader against real workers: DL-01, DL-02, DL-04, DL-06 and a healthy dataset."""

from __future__ import annotations

import logging
import multiprocessing
import re
import sys
import tempfile
import time

import psutil
import pytest
from conftest import PROGRAMS

from hangkit.agent.beacon import state
from hangkit.records import WorkerPhase
from hangkit.training.dataloader import (
    DataLoaderHang,
    DataLoaderWorkerDied,
    safe_dataloader,
)

sys.path.insert(0, str(PROGRAMS / "training_dl"))
import dl_datasets as datasets  # noqa: E402  (not `datasets`: the HF package's name)

LOGGER = "hangkit.training.dataloader"


def tries(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER]


def children() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True)
            if p.status() != psutil.STATUS_ZOMBIE}


def test_healthy_dataset_uses_requested_workers_and_publishes_states(caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    state.workers = []
    before = children()
    loader = safe_dataloader(datasets.Squares(64), batch_size=4, num_workers=2,
                             timeout=30, test_timeout=30)
    assert tries(caplog) == ["Trying DataLoader with 2 workers...",
                             "DataLoader test successful with 2 workers"]
    assert children() == before, "the test batch's workers outlived the test"
    assert loader.num_workers == 2 and loader.loader.persistent_workers is False
    seen = []
    published = None
    for batch in loader:
        seen.extend(batch[:, 0].tolist())
        published = published or list(state.workers)
    assert sorted(seen) == list(range(64))
    # Published at the start of the epoch (workers may still be starting) and at its end.
    assert [w.worker for w in published] == [0, 1]
    assert all(w.pid and w.state.alive for w in published), published
    final = state.workers
    assert {w.pid for w in final} == {w.pid for w in loader.last_states}
    assert all(w.state == WorkerPhase.EXITED and w.exit_code == 0 for w in final), final
    assert children() == before


def blocking_line() -> int:
    source = (PROGRAMS / "training_dl" / "dl_datasets.py").read_text().splitlines()
    return next(i for i, text in enumerate(source, 1) if "# the blocking line" in text)


def test_dl01_blocking_getitem_names_worker_index_and_stack(monkeypatch):
    monkeypatch.setenv("RANK", "5")
    loader = safe_dataloader(datasets.BlocksAt(32, stuck=9), batch_size=4, num_workers=2,
                             timeout=3, test_timeout=20)  # the first batch (0-3) is fine
    started = time.monotonic()
    with pytest.raises(DataLoaderHang) as info:
        for _ in loader:
            pass
    assert time.monotonic() - started < 25
    err = info.value
    text = str(err)
    (stuck,) = [w for w in err.workers if w.index == 9]
    assert stuck.state == WorkerPhase.FETCHING
    assert f"pid {stuck.pid}" in text
    assert "fetching dataset index 9" in text
    assert isinstance(err, TimeoutError) and "timed out" in str(err.__cause__)
    # The stack, from py-spy, reaches the blocking line of the dataset.
    assert f'dl_datasets.py", line {blocking_line()}, in BlocksAt.__getitem__' in text, text
    assert text.startswith("rank 5: "), text


def test_dl02_worker_killed_by_signal():
    # Index 29 is past what the test batch's workers prefetch (2 workers x 2 batches x 4 =
    # indices 0-15): the test passes, and the worker dies during the epoch.
    loader = safe_dataloader(datasets.KilledAt(32, fatal=29), batch_size=4, num_workers=2,
                             timeout=20, test_timeout=20)
    assert loader.num_workers == 2
    with pytest.raises(DataLoaderWorkerDied) as info:
        for _ in loader:
            pass
    text = str(info.value)
    (dead,) = info.value.workers
    assert (dead.state, dead.signal, dead.index) == (WorkerPhase.KILLED, 9, 29)
    assert f"worker {dead.worker} (pid {dead.pid}) killed by signal 9" in text, text
    assert "SIGKILL" in text and "while fetching dataset index 29" in text, text
    assert isinstance(info.value, RuntimeError)


def test_dl04_lock_held_at_fork_falls_back_to_zero_workers(caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    datasets.WANTED.clear()
    holder = datasets.hold_lock()
    try:
        loader = safe_dataloader(datasets.NeedsLock(16), batch_size=4, num_workers=2,
                                 fallback=(2, 1, 0), timeout=10, test_timeout=2,
                                 multiprocessing_context="fork")
    finally:
        datasets.WANTED.set()
        holder.join(10)
    assert loader.num_workers == 0
    lines = tries(caplog)
    assert lines[0] == "Trying DataLoader with 2 workers..."
    assert lines[1].startswith("DataLoader test with 2 workers failed: ")
    assert lines[2] == "Trying DataLoader with 1 workers..."
    assert lines[3].startswith("DataLoader test with 1 workers failed: ")
    assert lines[4:] == ["Trying DataLoader with 0 workers...",
                         "DataLoader test successful with 0 workers"]
    # Both workers are stuck on their first index (0 and 4, batches of 4); either is named.
    assert "within 2 s" in lines[1] and re.search(r"fetching dataset index [04]\b",
                                                  lines[1]), lines[1]
    assert len(list(loader)) == 4


def test_dl06_long_tmpdir_falls_back_to_zero_workers(caplog, monkeypatch, tmp_path):
    caplog.set_level(logging.INFO, logger=LOGGER)
    long_dir = tmp_path / ("t" * 60) / ("m" * 60)
    long_dir.mkdir(parents=True)
    monkeypatch.setenv("TMPDIR", str(long_dir))
    # Forked workers inherit what this process has already worked out from TMPDIR.
    monkeypatch.setattr(tempfile, "tempdir", None)
    monkeypatch.delitem(multiprocessing.current_process()._config, "tempdir", raising=False)
    before = children()
    loader = safe_dataloader(datasets.Squares(16), batch_size=4, num_workers=2,
                             fallback=(2, 0), timeout=10, test_timeout=3,
                             multiprocessing_context="fork")
    assert loader.num_workers == 0
    lines = tries(caplog)
    assert lines[0] == "Trying DataLoader with 2 workers..."
    assert lines[1].startswith("DataLoader test with 2 workers failed: ")
    # The workers fetched the batch but could not hand it back: it was lost on the way.
    assert "every worker is idle" in lines[1], lines[1]
    assert lines[2:] == ["Trying DataLoader with 0 workers...",
                         "DataLoader test successful with 0 workers"]
    assert children() == before
    assert len(list(loader)) == 4


def test_timeout_must_be_finite():
    with pytest.raises(ValueError):
        safe_dataloader(datasets.Squares(4), batch_size=2, timeout=0)
