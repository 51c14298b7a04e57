"""torch's Flight Recorder in hang reports: real DDP and gloo process groups under `hangkit watch`,
real dumps, torch's own analyzer, and `hangkit explain`.

NCCL cannot run here (no GPU): its states are tested on gloo dumps rewritten the way NCCL records
them, and said so where it is done.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import PROGRAMS, mpiexec, program
from test_watch_hangs import HANG, assert_all_gone, kinds

from hangkit.bundle import collect
from hangkit.cli import main as cli
from hangkit.errors import UsageError
from hangkit.flight_recorder.dumps import ANALYZER_PREFIX, read_directory, read_dump
from hangkit.flight_recorder.rules import diagnose_views
from hangkit.flight_recorder.view import merge, render
from hangkit.jupyter.dashboard_format import collective_text
from hangkit.launcher import free_port
from hangkit.records import RankStatus, Recording

DDP = "flight_recorder_ddp.py"
BACKWARD_LINE = next(i for i, line in enumerate(
    (PROGRAMS / DDP).read_text().splitlines(), 1) if line.strip() == "loss.backward()")


def watch_ddp(run_watch, mode: str, *options: str):
    run = run_watch([mpiexec(), "-n", "3", *program(DDP), mode],
                    options=["--timeout", "3", "--grace", "2", *options], timeout=120,
                    env={"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())})
    assert run.returncode == HANG, run.err
    return run


def recorded(report: dict) -> dict[int, dict]:
    return {p["rank"]: p["recording"]["dump"] for p in report["processes"]
            if p["role"] == "rank" and (p.get("recording") or {}).get("dump")}


def issued(dump: dict, group: str = "0") -> int:
    return int(dump["pg_status"][group]["last_enqueued_collective"])


@pytest.mark.timeout(180)
def test_ddp_rank_that_skips_a_step_is_named_with_the_collective_and_the_line(run_watch):
    run = watch_ddp(run_watch, "skip")
    report = run.report
    dumps = recorded(report)
    assert sorted(dumps) == [0, 1, 2]
    seq = issued(dumps[0])
    assert issued(dumps[2]) == seq and issued(dumps[1]) == seq - 1
    first = report["diagnosis"][0]  # the recorder's verdict comes ahead of the stack rules'
    assert first["kind"] == "TD-01" and first["ranks"] == [1], report["diagnosis"]
    summary = first["summary"]
    assert summary.startswith(f"Ranks 0,2 wait in all_reduce #{seq} of the default group "
                              "(DDP's gradient bucket; from `loss.backward()` at ")
    assert f"{DDP}:{BACKWARD_LINE}" in summary
    assert f"rank 1 never issued it (its last was #{seq - 1}): it is in read_checkpoint" in summary
    assert "checkpoint.pt" in summary
    assert "fifo-wait" in kinds(report)  # the stack rule still says what rank 1 waits on
    # Live: the monitor knew from the recorder's counters who was inside which collective.
    ranks = {r["rank"]: r for r in report["ranks"]}
    assert ranks[0]["status"] == "waiting" and ranks[0]["collective"]["inside"]
    assert ranks[0]["collective"]["op"] == "all_reduce" and ranks[0]["collective"]["seq"] == seq
    assert not ranks[1]["collective"]["inside"] and ranks[1]["collective"]["seq"] == seq - 1
    assert collective_text(RankStatus.from_json(ranks[0])).startswith(
        f"all_reduce #{seq} (inside ")  # as the dashboard shows it
    # The dumps beside the report, private, in the layout torch's analyzer reads; it agrees.
    files = sorted(run.report_dir.glob(f"{ANALYZER_PREFIX}*"))
    assert [f.name[len(ANALYZER_PREFIX):] for f in files] == ["0", "1", "2"]
    assert all(stat.S_IMODE(f.stat().st_mode) == 0o600 for f in files)
    assert torch_analyzer_missing_ranks(run.report_dir) == {seq: set(first["ranks"])}
    assert_all_gone([p["pid"] for p in report["processes"]])


@pytest.mark.timeout(180)
def test_without_the_recorder_the_stacks_see_ddps_collective_inside_backward(run_watch):
    """With --no-flight-recorder the stacks alone still tell that ranks 0 and 2 wait in DDP's
    gradient reduction (blocked inside backward(): hangkit/monitor/collectives.py), with no
    sequence number, and rank 1's FIFO."""
    run = watch_ddp(run_watch, "skip", "--no-flight-recorder")
    assert kinds(run.report) == ["TD-01", "fifo-wait"], run.report["diagnosis"]
    first = run.report["diagnosis"][0]
    assert first["ranks"] == [1] and first["summary"].startswith(
        "Ranks 0,2 wait in all_reduce (the gradient reduction of DDP or FSDP inside backward())")
    assert "#" not in first["summary"].split(";")[0]
    assert not recorded(run.report) and "Flight Recorder" not in run.err
    assert not list(run.report_dir.glob(f"{ANALYZER_PREFIX}*"))
    reasons = {p["recording"]["error"] for p in run.report["processes"] if p.get("recording")}
    assert reasons == {"its agent read no recorder: no process group, TORCH_FR_BUFFER_SIZE=0, "
                       "or a torch without one for this backend"}


def torch_analyzer_missing_ranks(directory: Path) -> dict[int, set[int]]:
    """{sequence number: missing ranks} as `fr_trace` prints them."""
    done = subprocess.run([sys.executable, "-m", "torch.distributed.flight_recorder.fr_trace",
                           str(directory)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    printed = done.stdout + done.stderr  # its logger writes to stderr
    found = re.findall(r"sequence number: (\d+).*?missing ranks: \{([\d, ]*)\}", printed, re.S)
    return {int(seq): {int(r) for r in ranks.split(",")} for seq, ranks in found}


@pytest.mark.timeout(180)
def test_a_subgroup_hang_names_the_group_while_the_default_group_is_fine(run_watch, capsys):
    run = watch_ddp(run_watch, "subgroup")
    (td10,) = [d for d in run.report["diagnosis"] if d["kind"] == "TD-10"]
    assert td10["ranks"] == [1]
    assert td10["summary"].startswith("Rank 0 waits in all_reduce #1 of group 1 (ranks 0,1) "
                                      "(from `dist.all_reduce(torch.ones(4), group=pair)` at")
    assert "rank 1 never issued it (it issued none in this group): it is in evaluate_on_rank_1" \
        in td10["summary"]
    assert "TD-01" not in kinds(run.report)
    assert "the default group: every rank completed" in run.err
    # After the fact, from the report alone: the same verdict (paths are shown relative to
    # the current directory, which differs).
    assert cli(["explain", str(run.report_dir)]) == 0
    (line,) = [x for x in capsys.readouterr().out.splitlines() if "[TD-10]" in x]
    assert line.startswith("  [TD-10] Rank 0 waits in all_reduce #1 of group 1 (ranks 0,1)")
    assert "rank 1 never issued it (it issued none in this group)" in line


@pytest.mark.timeout(180)
def test_pending_async_work_is_named_with_where_it_was_issued_and_where_it_is_waited_for(
        run_watch):
    run = watch_ddp(run_watch, "async")
    td01 = run.report["diagnosis"][0]
    assert td01["kind"] == "TD-01" and td01["ranks"] == [1]
    summary = td01["summary"]
    assert re.match(r"Ranks 0,2 wait in all_reduce #\d+ of the default group", summary)
    assert "async_op=True)` at" in summary and "waiting at `work.wait()` at" in summary


@pytest.mark.timeout(180)
def test_a_rank_whose_agent_cannot_answer_is_named_as_missing_not_dropped(run_watch):
    run = watch_ddp(run_watch, "gil")
    assert sorted(recorded(run.report)) == [0, 2]
    (waiting,) = [d for d in run.report["diagnosis"] if d["kind"] == "all-in-collective"]
    assert waiting["ranks"] == [1]
    assert ("rank 1 sent no recorder dump (its agent did not answer: its main thread holds the "
            "GIL): it is in hold_the_gil") in waiting["summary"]
    assert "no dump from rank 1: its agent did not answer" in run.err


# Sizes that differ: gloo fails (or completes) such a collective by itself, so the dumps come
# from a run that goes on past it, not from a hang.


@pytest.fixture(scope="module")
def size_mismatch(tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("sizes")
    env = {**os.environ, "HANGKIT_READY_DIR": str(out), "TORCH_FR_BUFFER_SIZE": "64",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    done = subprocess.run([mpiexec(), "-n", "3", *program("flight_recorder_sizes.py")],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return out, done.stdout


def agent_recordings(out: Path) -> list[Recording]:
    return [Recording(rank=r, dump=json.loads((out / "agent" / f"{r}.json").read_text()))
            for r in range(3)]


@pytest.mark.timeout(180)
def test_sizes_that_differ_across_ranks_are_td02(size_mismatch):
    out, printed = size_mismatch
    views = merge(agent_recordings(out))
    (td02,) = diagnose_views(views)
    assert td02.kind == "TD-02" and td02.ranks == [1]
    assert td02.summary.startswith("Ranks disagree on collective #3 of the default group: "
                                   "rank 1 all_reduce Float[6]; ranks 0,2 all_reduce Float[4]")
    assert "gloo fails such a collective on some ranks" in td02.summary
    text = "\n".join(render(views))
    assert "all_reduce Float[6]: 1" in text and "all_reduce Float[4]: 0,2" in text
    # What the ranks saw: gloo did not hang; at least one rank was failed.
    assert len(re.findall(r"rank \d: ", printed)) == 3  # mpiexec may interleave the lines
    assert re.search(r"rank \d: (?!completed)", printed), printed


@pytest.mark.timeout(180)
def test_explain_reads_the_dumps_torch_wrote_itself(size_mismatch, capsys):
    out, _ = size_mismatch
    torch_dumps = out / "torch"
    assert [r.rank for r in read_directory(torch_dumps)] == [0, 1, 2]
    assert cli(["explain", str(torch_dumps)]) == 0
    printed = capsys.readouterr().out
    assert "Flight Recorder dumps of 3 rank(s)" in printed
    assert "[TD-02] Ranks disagree on collective #3 of the default group" in printed


@pytest.mark.timeout(180)
def test_the_support_bundle_keeps_torchs_dumps_as_json_and_explain_reads_them(
        size_mismatch, tmp_path, capsys):
    out, _ = size_mismatch
    environ = {"TORCH_FR_DUMP_TEMP_FILE": str(out / "torch" / "nccl_trace_rank_")}
    bundle = collect(environ=environ, cwd=tmp_path, timeout=60)
    names = sorted(n for n in bundle.members if n.startswith("flight-recorder/"))
    assert names == [f"flight-recorder/nccl_trace_rank_{r}.json" for r in range(3)]
    unpacked = tmp_path / "flight-recorder"
    unpacked.mkdir()
    for name in names:
        (tmp_path / name).write_text(bundle.members[name])
    assert cli(["explain", str(unpacked)]) == 0
    assert "[TD-02] Ranks disagree on collective #3" in capsys.readouterr().out
    # Where there are none, the README says where they would have been and how to keep them.
    bare = collect(environ={"TORCH_FR_DUMP_TEMP_FILE": str(tmp_path / "none_")}, cwd=tmp_path,
                   timeout=60)
    (why,) = [w for m, w in bare.missing if m == "flight-recorder/"]
    assert f"none under {tmp_path / 'none_'}RANK" in why


def test_two_dumps_of_one_rank_are_refused(size_mismatch, tmp_path):
    out, _ = size_mismatch
    for name in ("nccl_trace_rank_0", "flight_recorder_rank_0"):
        (tmp_path / name).write_bytes((out / "torch" / "nccl_trace_rank_0").read_bytes())
    with pytest.raises(UsageError, match="two dumps of rank 0"):
        read_directory(tmp_path)


@pytest.mark.timeout(180)
def test_a_rank_without_a_dump_is_missing_from_the_view(size_mismatch):
    out, _ = size_mismatch
    recordings = [r for r in agent_recordings(out) if r.rank != 2]
    (view,) = merge(recordings, world=[0, 1, 2])
    assert view.missing == [2] and view.dumped == [0, 1]
    assert "  no dump from rank 2: gone" in render([view], lambda r: "gone")


# NCCL cannot run here. Its recorder has the same format, with states that gloo's lacks:
# scheduled, started (with TORCH_NCCL_ENABLE_TIMING=1), completed. These dumps are real gloo
# dumps rewritten the way NCCL records a collective that rank 1 scheduled but never started.


def as_nccl(dump: dict, seq: int, state: str, *, timing: bool = True) -> dict:
    dump = json.loads(json.dumps(dump))
    for e in dump["entries"]:
        e["profiling_name"] = e["profiling_name"].replace("gloo:", "nccl:")
        e["state"] = "completed" if e["collective_seq_id"] < seq else state
        e["retired"] = e["collective_seq_id"] < seq
    status = dump["pg_status"]["0"]
    status["last_completed_collective"] = seq - 1
    status["last_started_collective"] = (seq if state == "started" else seq - 1) if timing else -1
    return dump


@pytest.mark.timeout(180)
def test_nccl_state_decides_who_waits_td09(size_mismatch):
    out, _ = size_mismatch
    dumps = [r.dump for r in agent_recordings(out)]
    for d in dumps:  # the same sizes everywhere, so the state alone is left to judge
        for e in d["entries"]:
            e["input_sizes"] = e["output_sizes"] = [[4]]
    states = {0: "started", 1: "scheduled", 2: "started"}
    recordings = [Recording(rank=r, dump=as_nccl(dumps[r], 3, states[r])) for r in range(3)]
    (td09,) = diagnose_views(merge(recordings))
    assert td09.kind == "TD-09" and td09.ranks == [1]
    assert "it started on ranks 0,2 but not on rank 1" in td09.summary
    # Without TORCH_NCCL_ENABLE_TIMING every rank's entry reads "scheduled": no start is known,
    # so nobody is blamed for not starting it.
    untimed = [Recording(rank=r, dump=as_nccl(dumps[r], 3, "scheduled", timing=False))
               for r in range(3)]
    (waiting,) = diagnose_views(merge(untimed))
    assert waiting.kind == "all-in-collective" and waiting.ranks == [0, 1, 2]
    assert "started" not in "\n".join(render(merge(untimed)))


# Reading files


def test_a_pickle_that_names_a_callable_is_refused(tmp_path):
    path = tmp_path / "nccl_trace_rank_0"
    path.write_bytes(pickle.dumps({"entries": [Path("/etc/passwd")]}))
    with pytest.raises(UsageError, match="refusing to load pathlib"):
        read_dump(path)


def test_explain_on_a_path_that_holds_no_dump_is_one_line_and_exit_2(tmp_path, capsys):
    (tmp_path / "notes_1").write_text("not a dump")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "trace_0").write_text('{"entries": [["not", "an", "entry"]]}')
    assert cli(["explain", str(tmp_path / "other")]) == 2
    assert "its entries are not torch's" in capsys.readouterr().err
    assert cli(["explain", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a Flight Recorder dump" in err
    assert cli(["explain", str(tmp_path / "missing")]) == 2
    assert "no such file or directory" in capsys.readouterr().err


# The rank's side


RANK_SIDE = """
import json, os, sys
import torch, torch.distributed as dist
from hangkit.agent.recorder import LiveCollective, recording
before = recording()
dist.init_process_group("gloo", rank=0, world_size=1, init_method=sys.argv[1])
for _ in range(3):
    dist.all_reduce(torch.ones(2))
live = LiveCollective().read()
dump = recording()
print(json.dumps({"before": before, "live": live and live.to_json(),
                  "entries": None if dump is None else len(dump["entries"]),
                  "groups": None if dump is None else dump["pg_config"]}), flush=True)
os._exit(0)  # gloo's teardown at exit sometimes aborts ("terminate called without an active
# exception"), which is torch's and not what this tests
"""


@pytest.mark.timeout(180)
@pytest.mark.parametrize("buffer", ["0", "16"])
def test_without_a_recorder_the_agent_reads_nothing(buffer):
    # "0" is the recorder off (torch 2.13 has it on by default; older ones off).
    env = {**os.environ, "TORCH_FR_BUFFER_SIZE": buffer}
    done = subprocess.run([sys.executable, "-c", RANK_SIDE, f"tcp://127.0.0.1:{free_port()}"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    found = json.loads(done.stdout.splitlines()[-1])
    assert found["before"] is None  # no process group yet
    if buffer == "0":
        assert found == {"before": None, "live": None, "entries": None, "groups": None}
    else:
        assert found["entries"] == 3
        assert found["groups"]["0"]["ranks"] == "[0]"
        assert found["live"]["seq"] == 3 and not found["live"]["inside"]


@pytest.mark.parametrize(("env", "expected"), [
    ({"TORCH_FR_DUMP_TEMP_FILE": "/scratch/j/trace_", "HOME": "/home/u"}, ["/scratch/j/trace_"]),
    ({"XDG_CACHE_HOME": "/c", "HOME": "/home/u"},
     ["/c/torch/comm_lib_trace_rank_", "/tmp/nccl_trace_rank_"]),
    ({"HOME": "/home/u"}, ["/home/u/.cache/torch/comm_lib_trace_rank_", "/tmp/nccl_trace_rank_"]),
    ({}, ["/tmp/.cache/torch/comm_lib_trace_rank_", "/tmp/nccl_trace_rank_"]),
])
def test_where_torch_writes_its_own_dumps(env, expected):
    from hangkit.flight_recorder.environment import dump_prefixes

    assert dump_prefixes(env) == expected
