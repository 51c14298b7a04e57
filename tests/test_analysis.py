"""The pure parts: records, grouping, the merged tree, roles, redaction, the output tail.

These run on records built by hand: the functions under test take records and nothing else.
"""

from __future__ import annotations

import json

import pytest

import hangkit
from hangkit.envsetup import AF_UNIX_PATH_MAX, af_unix_path_length
from hangkit.monitor.collectives import collective_of
from hangkit.monitor.diagnose import diagnose
from hangkit.monitor.merge import groups, merged_tree, render_tree
from hangkit.monitor.output import OutputTail
from hangkit.monitor.report import build_report, render_markdown
from hangkit.monitor.roles import assign_roles
from hangkit.monitor.stacks import is_user_frame, short_path
from hangkit.records import Frame, HangReport, ProcessSnapshot, ThreadStack
from hangkit.redact import redact_argv, redact_environ
from hangkit.text import format_ranks

SITE = "/opt/conda/lib/python3.11/site-packages"
C10D = f"{SITE}/torch/distributed/distributed_c10d.py"


def rank_proc(rank, frames, *, pid=None, state="blocked", cmd=("python", "train.py")):
    pid = pid or 100 + rank
    return ProcessSnapshot(
        pid=pid, ppid=1, rank=rank, role="rank", cmdline=list(cmd), state=state,
        cpu_percent=0.0, threads=[ThreadStack(id=1, name="MainThread", frames=frames,
                                              os_thread_id=pid, is_main=True)])


def f(function, file="/home/u/train.py", line=1, native=False):
    return Frame(function, file, line, native)


def td01_ranks():
    common = [f("<module>", line=120), f("main", line=100)]
    waiting = common + [f("train_step", line=88), f("all_reduce", C10D, 2500)]
    wandered = common + [f("evaluate", "/home/u/eval.py", 40)]
    return [rank_proc(0, waiting), rank_proc(1, waiting), rank_proc(2, wandered),
            rank_proc(3, waiting)]


def test_public_api_is_pinned():
    assert sorted(hangkit.__all__) == sorted([
        "Beat", "CaptureError", "CollectiveState", "Diagnosis", "Frame", "HangReport",
        "HangkitError", "Monitor", "ProbeResult", "ProcessSnapshot", "ProcessState",
        "RankState", "RankStatus", "Role", "StackGroup", "StallEvent", "ThreadStack",
        "TreeNode", "UsageError", "WorkerPhase", "WorkerState", "__version__", "doctor",
        "instrument", "progress", "start_agent", "stop_agent"])
    assert all(getattr(hangkit, name) is not None for name in hangkit.__all__)
    assert issubclass(hangkit.UsageError, ValueError)


@pytest.mark.parametrize("ranks, text", [
    ([0, 1, 2, 3], "0-3"), ([0, 1, 3], "0,1,3"), ([5, 0, 1, 2, 7, 8], "0-2,5,7,8"), ([], ""),
])
def test_format_ranks(ranks, text):
    assert format_ranks(ranks) == text


def test_user_frames_exclude_stdlib_packages_and_native():
    assert is_user_frame(f("main", "/home/u/train.py"))
    assert not is_user_frame(f("get", "/usr/lib/python3.11/queue.py"))
    assert not is_user_frame(f("all_reduce", C10D))
    assert not is_user_frame(f("PMPI_Barrier", "libmpi.so.12", native=True))
    assert short_path(C10D) == "torch/distributed/distributed_c10d.py"


def test_groups_put_ranks_at_the_same_user_frame_together():
    g = groups(td01_ranks())
    assert [(x.ranks, x.location) for x in g] == [
        ([0, 1, 3], "train_step at /home/u/train.py:88"),
        ([2], "evaluate at /home/u/eval.py:40")]
    assert g[0].frames[0].function == "<module>", "frames are outermost first"


def test_merged_tree_carries_rank_sets_and_renders_the_split():
    tree = merged_tree(td01_ranks())
    assert tree.ranks == [0, 1, 2, 3]
    (module,) = tree.children
    (main,) = module.children
    assert [c.ranks for c in main.children] == [[0, 1, 3], [2]]
    lines = render_tree(tree)
    assert lines[0].startswith("[ranks 0-3] <module>")
    assert any(line.startswith("├─ [ranks 0,1,3] train_step") for line in lines)
    assert any(line.startswith("└─ [rank 2] evaluate") for line in lines)


def test_collective_split_names_the_odd_rank_out():
    (d,) = [x for x in diagnose(td01_ranks()) if x.kind == "TD-01"]
    assert d.ranks == [2]
    assert d.summary.startswith("Ranks 0,1,3 wait in all_reduce at /home/u/train.py:88")
    assert "rank 2 (pid 102) is in evaluate at /home/u/eval.py:40" in d.summary


def test_different_collectives_are_a_desync():
    procs = td01_ranks()
    procs[2].threads[0].frames.append(f("broadcast", C10D, 2700))
    kinds = {d.kind: d for d in diagnose(procs)}
    assert "TD-02" in kinds and "TD-01" not in kinds
    assert "rank 2 in broadcast" in kinds["TD-02"].summary
    assert "ranks 0,1,3 in all_reduce" in kinds["TD-02"].summary


def test_mpi_collective_from_native_frames():
    frames = [f("<module>", line=6), f("Barrier", "/x/mpi4py/MPI.so", native=True),
              f("PMPI_Barrier", "/x/libmpi.so.12", native=True)]
    c = collective_of(ThreadStack(id=1, name=None, frames=frames, is_main=True))
    assert (c.op, c.family, c.call_site.line) == ("Barrier", "mpi", 6)


def test_busy_rank_in_a_collective_is_waiting_not_working():
    procs = td01_ranks()
    for p in procs:
        if p.rank != 2:
            p.state, p.cpu_percent = "busy", 99.0  # MPI and some gloo paths spin while waiting
    assert "IP-04" not in [d.kind for d in diagnose(procs)]
    procs[2].state, procs[2].cpu_percent = "busy", 100.0
    assert [d.ranks for d in diagnose(procs) if d.kind == "IP-04"] == [[2]]


def test_nothing_recognised_still_says_where_ranks_are():
    (d,) = diagnose([rank_proc(0, [f("<module>"), f("wait_for_godot", line=9)])])
    assert d.kind == "unknown" and "wait_for_godot at /home/u/train.py:9" in d.summary


def test_roles_launchers_ranks_workers_and_inherited_ranks():
    def snap(pid, ppid, cmd, frames=()):
        return ProcessSnapshot(pid=pid, ppid=ppid, rank=None, role="other", cmdline=cmd,
                               state="blocked", threads=[ThreadStack(
                                   1, None, list(frames), os_thread_id=pid, is_main=True)])
    loop = f("_worker_loop", f"{SITE}/torch/utils/data/_utils/worker.py", 300)
    procs = [
        snap(10, 1, ["python", "launch.py"]),  # a wrapper that runs mpiexec: no rank of its own
        snap(11, 10, ["mpiexec", "-n", "2", "bash", "run.sh"]),
        snap(12, 11, ["hydra_pmi_proxy"]),
        snap(13, 12, ["bash", "run.sh"]),  # the per-rank shell carries PMI_RANK
        snap(14, 13, ["python", "train.py"]),
        snap(15, 14, ["python", "train.py"], [loop]),  # forked DataLoader worker
        snap(16, 14, ["python", "-c", "helper"]),  # a subprocess of the rank
    ]
    assign_roles(procs, {13: 0, 14: 0, 15: 0, 16: None})
    roles = {p.pid: (p.role, p.rank) for p in procs}
    assert roles == {10: ("launcher", None), 11: ("launcher", None), 12: ("launcher", None),
                     13: ("launcher", 0), 14: ("rank", 0), 15: ("dataloader-worker", 0),
                     16: ("other", 0)}


def test_report_round_trips_through_json_and_renders():
    report = build_report(reason="test", command=["python", "train.py", "--token=abc"],
                          idle_seconds=3.0, processes=td01_ranks(), last_lines=["x"],
                          context={})
    again = HangReport.from_json(json.loads(json.dumps(report.to_json())))
    assert again == report
    assert again.command == ["python", "train.py", "--token=<redacted>"]
    md = render_markdown(again)
    assert "### TD-01" in md and "[rank 2] evaluate" in md


def test_report_hides_secrets_the_job_printed():
    report = build_report(reason="test", command=["python"], idle_seconds=3.0,
                          processes=td01_ranks(), context={},
                          last_lines=["step 3", "export WANDB_API_KEY=abc123def"])
    assert report.last_lines == ["step 3", "export WANDB_API_KEY=<redacted>"]
    assert "abc123def" not in render_markdown(report)


def test_redaction():
    assert redact_environ({"WANDB_API_KEY": "s", "HF_TOKEN": "t", "db_password": "p",
                           "NCCL_DEBUG": "INFO"}) == {
        "WANDB_API_KEY": "<redacted>", "HF_TOKEN": "<redacted>", "db_password": "<redacted>",
        "NCCL_DEBUG": "INFO"}
    assert redact_argv(["train.py", "--api-key", "s", "--secret=t", "MY_TOKEN=u", "--lr", "1"]) \
        == ["train.py", "--api-key", "<redacted>", "--secret=<redacted>", "MY_TOKEN=<redacted>",
            "--lr", "1"]


def test_output_tail_keeps_the_last_lines_of_both_streams():
    tail = OutputTail(keep=3)
    tail.feed(1, b"a\nb\nc")
    tail.feed(2, b"err1\n")
    tail.feed(1, b"d\ne\n")
    tail.feed(2, b"no newline yet")
    assert tail.lines() == ["cd", "e", "no newline yet"]
    tail.feed(1, b"".join(b"flood %d\n" % i for i in range(10_000)) + b"part")
    assert tail.lines() == ["flood 9999", "part", "no newline yet"]
    tail.feed(1, b"ial\n")
    assert tail.lines() == ["flood 9999", "partial", "no newline yet"]


def test_af_unix_path_length_matches_multiprocessing():
    assert af_unix_path_length("/tmp") == len("/tmp/pymp-abcdefgh/listener-abcdefgh")
    assert af_unix_path_length("/" + "x" * 80) > AF_UNIX_PATH_MAX


def test_report_shows_the_workers_a_rank_published():
    from hangkit.monitor.report import render_ranks
    from hangkit.records import RankStatus, WorkerPhase, WorkerState

    workers = [WorkerState(0, 41, WorkerPhase.FETCHING, index=9, since=1.0, seconds=12.34),
               WorkerState(1, 42, WorkerPhase.KILLED, signal=9)]
    status = RankStatus(key="rank 2", rank=2, pid=40, host="n1", status="stalled", step=7,
                        phase="data", workers=workers)
    report = HangReport(hang=True, reason="r", command=[], idle_seconds=1.0, ranks=[status])
    lines = render_ranks(HangReport.from_json(json.loads(json.dumps(report.to_json()))))
    assert lines[1:] == ["    DataLoader worker 0 (pid 41) fetching dataset index 9 for 12.3 s",
                         "    DataLoader worker 1 (pid 42) killed by signal 9 (SIGKILL)"], lines
    assert "DataLoader worker 0 (pid 41) fetching dataset index 9" in render_markdown(report)


def test_a_report_of_hangkit_0_1_0_opens_and_one_from_a_newer_version_too():
    """0.1.0 wrote no schema, roles and states as words, and DataLoader workers as untyped
    dicts in a rank's extra; a newer version may add fields anywhere."""
    from hangkit.records import RankState, Role, WorkerPhase

    old = {
        "hang": True, "reason": "no output for 10 s", "command": ["mpiexec"], "idle_seconds": 10,
        "processes": [{"pid": 7, "ppid": 1, "rank": 0, "role": "rank", "cmdline": ["python"],
                       "state": "blocked", "threads": [{"id": 1, "name": None, "frames": [
                           {"function": "main", "file": "train.py", "line": 3}]}]}],
        "ranks": [{"key": "rank 0", "rank": 0, "pid": 7, "host": "n1", "status": "stalled",
                   "extra": {"dataloader_workers": [
                       {"worker": 0, "pid": 8, "state": "killed by signal 9", "signal": 9},
                       {"worker": 1, "pid": 9, "state": "exited with code 3"}]}}],
        "events": [{"kind": "stall", "summary": "no rank advanced"}],
    }
    report = HangReport.from_json(old)
    assert report.schema == 0
    (p,) = report.processes
    assert (p.role, p.state) == (Role.RANK, "blocked")
    (r,) = report.ranks
    assert r.status == RankState.STALLED and r.extra == {}
    assert [(w.state, w.signal, w.exit_code) for w in r.workers] == [
        (WorkerPhase.KILLED, 9, None), (WorkerPhase.EXITED, None, 3)]

    def newer(d):  # every record of the report grows a field this version does not know
        if isinstance(d, dict):
            return {**{k: newer(v) for k, v in d.items()}, "added_later": 1}
        return [newer(x) for x in d] if isinstance(d, list) else d

    future = newer(report.to_json())
    future["processes"][0]["role"] = "relay"  # a role this version does not know
    again = HangReport.from_json(future)
    assert again.schema == 0  # read as it was written
    assert HangReport(True, "r", [], 0.0).schema == hangkit.records.SCHEMA
    assert again.processes[0].role == Role.OTHER
    assert again.ranks[0].workers == r.workers


def test_build_report_leaves_the_snapshots_it_is_given_alone():
    rank = rank_proc(0, [f("main")], cmd=("python", "train.py", "--api-key", "s3cret"))
    before = rank.to_json()
    report = build_report(reason="r", command=["python", "--token=abc"], idle_seconds=1,
                          processes=[rank], last_lines=[], context={})
    assert rank.to_json() == before
    assert report.processes[0].cmdline == ["python", "train.py", "--api-key", "<redacted>"]


@pytest.mark.parametrize("kind, expected", [("file", "slow-filesystem"), ("fifo", "fifo-wait")])
def test_a_blocked_open_is_a_slow_filesystem_unless_it_is_a_fifo(kind, expected):
    from hangkit.records import Syscall

    p = rank_proc(0, [f("<module>"), f("load_shard", line=9)])
    p.syscall = Syscall("openat", 257, "/lustre/data/shard-0007.bin", target_kind=kind)
    (d,) = [d for d in diagnose([p]) if d.kind in ("slow-filesystem", "fifo-wait")]
    assert d.kind == expected and "shard-0007.bin" in d.summary and d.ranks == [0]
