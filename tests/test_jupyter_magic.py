"""`%%hk` in a real kernel (nbclient), on real MPI engines: the namespace kept from cell to cell,
--targets, IP-01 returning long before its deadline with the traceback, where the others
wait and a report, cells after cluster.restart(), one rank interrupted alone (in Python, and
inside a C call), DL-01 in the user's own Dataset at the deadline, and with --silence long
before it (while cells that print or report progress run to their end)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import uuid
from pathlib import Path

import nbformat
import psutil
import pytest
from conftest import TAG_VARIABLE, tagged_processes
from nbclient import NotebookClient

from hangkit.bundle import collect

pytestmark = pytest.mark.timeout(600)

SETUP = """\
import os
os.environ["HANGKIT_NONINTERACTIVE"] = "1"
os.environ["IPYTHONDIR"] = os.path.abspath("ipython")  # its own ipyparallel profile
from hangkit.jupyter import EngineCluster
cluster = EngineCluster(4, start_timeout=120).start()
%load_ext hangkit.jupyter
import time

def until_phase(rank, phase, timeout=60):
    # The readiness signal of a --noblock cell: its rank reported the phase it blocks in.
    deadline = time.monotonic() + timeout
    while not any(s.rank == rank and s.phase == phase for s in cluster.monitor.statuses()):
        assert time.monotonic() < deadline, cluster.monitor.statuses()
        time.sleep(0.05)  # ok-sleep: polled against the deadline above"""

# A cell whose own Dataset hangs its DataLoader worker (DL-01); the benchmark's too.
HUNG_WORKER = """\
import threading
import torch
from torch.utils.data import DataLoader, Dataset

class Shards(Dataset):
    def __len__(self):
        return 64

    def __getitem__(self, index):
        if index == 9:
            threading.Event().wait()  # a shard whose read never returns
        return torch.zeros(2)

for batch in DataLoader(Shards(), batch_size=4, num_workers=1):
    pass"""

CELLS = {
    "keep": "%%hk\nfrom mpi4py import MPI\nrank = MPI.COMM_WORLD.Get_rank()\n"
            "seen = 10 * rank\nprint('set', seen)",
    "targets": "%%hk --targets 1,3\nseen += 1\nprint('now', seen)",
    "ip01": "%%hk --timeout 240\nif rank == 2:\n    raise ValueError('a bad sample on rank 2')\n"
            "MPI.COMM_WORLD.Barrier()",
    "restart": "cluster.restart()\nNone",
    "again": "%%hk --timeout 120\nimport os\nprint('fresh', 'seen' in dir())",
    "quiet": "%%hk --timeout 240 --progress-timeout 3\nimport hangkit, threading\n"
             "hangkit.progress(step=1)\nthreading.Event().wait(600)",
    "interrupt_quiet": "print('\\n'.join(cluster.interrupt(escalate=False)))",
    "loop": "%%hk --noblock\nimport time\nfrom mpi4py import MPI\n"
            "rank = MPI.COMM_WORLD.Get_rank()\nhangkit.progress(phase=f'looping {rank}')\n"
            "while rank == 1:\n    time.sleep(0.05)  # ok-sleep: the Python loop interrupted\n",
    "interrupt_python": "until_phase(1, 'looping 1')\n"
                        "print('\\n'.join(cluster.interrupt([1], escalate=False)))",
    "after": "%%hk --timeout 60\nprint('alive', rank)",
    "in_c": "%%hk --noblock\nhangkit.progress(phase='barrier')\nif rank == 1:\n"
            "    MPI.COMM_WORLD.Barrier()",
    "interrupt_c": "until_phase(1, 'barrier')\n"
                   "print('\\n'.join(cluster.interrupt([1], grace=2, escalate=False)))",
    "restart2": "cluster.restart()\nNone",  # ranks stay in their barriers: new engines
    # --silence: output, or progress beats without output, keep a quiet cell from a look.
    "chatty": "%%hk --timeout 240 --silence 5\nimport time\nfor i in range(30):\n"
              "    print('tick', i)\n    time.sleep(0.5)  # ok-sleep: output every 0.5 s",
    "beating": "%%hk --timeout 240 --silence 3\nimport hangkit, time\nfor i in range(18):\n"
               "    hangkit.progress(step=i)\n    time.sleep(0.5)  # ok-sleep: beats, no output\n"
               "print('beats done')",
    "bad_silence": "%%hk --silence -1\nprint('never run')",
    # torch imported before the silent cell: on a loaded machine one library's load can stand
    # still for a whole look, and the silence to catch is the worker's.
    "warm": "%%hk --timeout 240 --silence 0\nimport torch",
    "dl_silent": "%%hk --timeout 300 --silence 5\n" + HUNG_WORKER,
    "silent_took": "run = cluster.cells[-1]\n"
                   "print(f'outcome {run.outcome} after {time.monotonic() - run.started:.1f} s')",
    "restart3": "cluster.restart()\nNone",  # the silent cell's workers stay stuck: new engines
    "dl01": "%%hk --timeout 20\n" + HUNG_WORKER,
    "close": "cluster.close()",
}


def stdout(cell) -> str:
    return "".join(o.get("text", "") for o in cell.outputs if o.get("output_type") == "stream")


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    """The notebook run once. Its kernel and every engine carry a tag of their own: a cell
    that fails stops the notebook before its close cell, and the engines would outlive the
    kernel; whatever carries the tag afterwards is killed, and fails the test."""
    workdir = tmp_path_factory.mktemp("notebook")
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(SETUP)] + [
        nbformat.v4.new_code_cell(code, metadata={"name": name}) for name, code in CELLS.items()]
    client = NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(workdir)}})
    tag, before = uuid.uuid4().hex, os.environ.get(TAG_VARIABLE)
    os.environ[TAG_VARIABLE] = tag
    try:
        client.execute()
    finally:
        if before is None:
            os.environ.pop(TAG_VARIABLE, None)
        else:
            os.environ[TAG_VARIABLE] = before
        left = tagged_processes(tag)
        for proc in left:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        psutil.wait_procs(left, timeout=10)
    assert not left, f"processes left by the notebook: {[p.pid for p in left]}"
    cells = {c.metadata.get("name"): c for c in nb.cells}
    return cells, workdir


def test_the_namespace_is_kept_and_targets_pick_ranks(executed):
    cells, _ = executed
    assert sorted(re.findall(r"\[stdout:(\d)\] set (\d+)", stdout(cells["keep"]))) == [
        ("0", "0"), ("1", "10"), ("2", "20"), ("3", "30")]
    assert sorted(re.findall(r"\[stdout:(\d)\] now (\d+)", stdout(cells["targets"]))) == [
        ("1", "11"), ("3", "31")]


def test_ip01_returns_with_the_traceback_where_the_others_wait_and_a_report(executed):
    cells, workdir = executed
    out = stdout(cells["ip01"])
    assert "[rank 2] raised:" in out and "ValueError" in out
    assert ("[TD-04] rank 2 raised ValueError: a bad sample on rank 2 at the cell's line 2 "
            "(`raise ValueError('a bad sample on rank 2')`); ranks 0,1,3 are in <module> at "
            "the cell's line 3 (`MPI.COMM_WORLD.Barrier()`)") in out
    assert "EpollSelector" not in out.split("Diagnosis:")[1]  # not the engine's idle loop
    (path,) = re.findall(r"hangkit: report: (\S+hang-report\.md)", out)
    report = json.loads((workdir / Path(path).parent / "hang-report.json").read_text())
    assert report["diagnosis"][0]["kind"] == "TD-04" and report["diagnosis"][0]["ranks"] == [2]
    assert "cluster.interrupt()" in out


def test_cells_run_again_after_a_restart(executed):
    cells, _ = executed
    assert sorted(re.findall(r"\[stdout:(\d)\] fresh False", stdout(cells["again"]))) == [
        "0", "1", "2", "3"]  # new engines: a new namespace


def test_one_rank_is_interrupted_alone_where_it_runs_python(executed):
    cells, _ = executed
    out = stdout(cells["interrupt_python"])
    assert ("rank 1 raised KeyboardInterrupt in the cell's code; its engine goes on, namespace "
            "kept, and so do the other ranks") in out, out
    assert sorted(re.findall(r"\[stdout:(\d)\] alive (\d)", stdout(cells["after"]))) == [
        (str(r), str(r)) for r in range(4)]


def test_a_progress_stall_ends_the_cell_long_before_its_deadline(executed):
    cells, _ = executed
    out = stdout(cells["quiet"])
    assert "HANG: a %%hk cell: no rank reported progress for 3 s (--progress-timeout)" in out
    assert "ranks 0-3: <module> at the cell's line 3 (`threading.Event().wait(600)`)" in out, out
    assert "ranks 0-3 raised KeyboardInterrupt" in stdout(cells["interrupt_quiet"])


def test_a_rank_inside_a_c_call_is_said_to_be_and_what_to_do(executed):
    cells, _ = executed
    out = stdout(cells["interrupt_c"])
    assert "SIGINT to rank 1: no effect within 2 s" in out, out
    assert "rank 1 is inside a C call" in out and "cluster.interrupt() escalates" in out


def test_a_silent_cell_whose_worker_hangs_returns_long_before_its_deadline(executed):
    """No hangkit.progress() in the cell, no output: --silence 5 and a look, not the 300 s
    deadline; the verdict names the worker and where it is in the user's own Dataset."""
    cells, workdir = executed
    out = stdout(cells["dl_silent"])
    assert ("HANG: a %%hk cell: no output and no progress for 5 s (--silence 5)") in out, out
    assert "ran past its deadline" not in out
    assert re.search(r"\[DL-01\] rank \d .* worker pid \d+ is in Shards\.__getitem__ at the "
                     r"cell's line 11 \(`threading\.Event\(\)\.wait\(\)", out), out
    took = re.search(r"outcome (\w+) after ([\d.]+) s", stdout(cells["silent_took"]))
    assert took and took.group(1) == "silent", stdout(cells["silent_took"])
    assert float(took.group(2)) < 150, took.group(0)  # 5 s and a look; the deadline is 300 s
    (path,) = re.findall(r"hangkit: report: (\S+hang-report\.md)", out)
    report = json.loads((workdir / Path(path).parent / "hang-report.json").read_text())
    assert "DL-01" in [d["kind"] for d in report["diagnosis"]]


def test_output_or_progress_keeps_a_cell_from_being_called_silent(executed):
    cells, _ = executed
    chatty, beating = stdout(cells["chatty"]), stdout(cells["beating"])
    assert sorted(re.findall(r"\[stdout:(\d)\] tick 29", chatty)) == ["0", "1", "2", "3"], chatty
    assert sorted(re.findall(r"\[stdout:(\d)\] beats done", beating)) == ["0", "1", "2", "3"], \
        beating
    for out in (chatty, beating):
        assert "HANG" not in out and "looking again" not in out, out
    assert "hangkit: error: --silence must be zero or more seconds, got -1" in stdout(
        cells["bad_silence"])
    assert "never run" not in stdout(cells["bad_silence"])


def test_dl01_in_the_users_own_dataset_at_the_deadline(executed):
    cells, workdir = executed
    out = stdout(cells["dl01"])
    assert "ran past its deadline (--timeout 20)" in out
    (path,) = re.findall(r"hangkit: report: (\S+hang-report\.md)", out)
    report = json.loads((workdir / Path(path).parent / "hang-report.json").read_text())
    workers = [p for p in report["processes"] if p["role"] == "dataloader-worker"]
    assert workers, [p["role"] for p in report["processes"]]
    frames = [f["function"] for w in workers for t in w["threads"] for f in t["frames"]]
    assert any(name.endswith("__getitem__") for name in frames), frames
    assert "DL-01" in [d["kind"] for d in report["diagnosis"]]
    # `hangkit report`, run where the notebook ran, finds the newest of its reports.
    bundle = collect(cwd=workdir, environ={}, timeout=60)
    (about,) = [a for m, _, a in bundle.held if m == "hang-report/"]
    assert str(Path(path).parent) in about, about
