"""Files someone else wrote: Flight Recorder dumps and hang reports built to hang, fill or crash
their reader (a pickle bomb, a list that holds itself, a tuple for a key, nesting 10,000 deep,
the wrong type in any field, a 200 MB value, a dump planted in a directory anyone can write).
Each is one line and exit 2, or a report shown with what could not be shown named, within
seconds (hangkit/safeload.py, hangkit/records/base.py conform)."""

from __future__ import annotations

import copy
import functools
import json
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hangkit.bundle import collect
from hangkit.cli import main as cli
from hangkit.errors import UsageError
from hangkit.flight_recorder.dumps import read_dump
from hangkit.jupyter import show_report
from hangkit.monitor.report import JSON_NAME, build_report, read_report, write_report
from hangkit.records import (
    CollectiveState,
    Frame,
    Look,
    NodeReport,
    ProcessLook,
    ProcessSnapshot,
    RankStatus,
    Recording,
    StallEvent,
    Syscall,
    ThreadStack,
    WorkerState,
)
from hangkit.safeload import DUMP_LIMITS, Refused, load_json, load_pickle, plain_data
from hangkit.text import SHOWN_CHARACTERS

HANGKIT = [sys.executable, "-m", "hangkit"]
BOUND = 60.0  # seconds: ten times what any of these needs on a loaded machine
NOBODY = 65534


def bomb() -> bytes:
    """Some 260 bytes that a json round trip expands to 2**40 lists."""
    return pickle.dumps(functools.reduce(lambda a, _: [a, a], range(40), ["x"]))


def torch_dump(rank: int, last: int = 3, done: int = 2) -> dict:
    """A dump in torch's format (a gloo default group of 2 ranks)."""
    entries = [{"record_id": s, "pg_id": 0, "process_group": ["0", "default_pg"],
                "collective_seq_id": s, "p2p_seq_id": 0, "op_id": s,
                "profiling_name": "gloo:all_reduce", "time_created_ns": 1,
                "input_sizes": [[10]], "input_dtypes": ["Float"], "output_sizes": [[10]],
                "output_dtypes": ["Float"], "state": "scheduled", "retired": s <= done,
                "timeout_ms": 1800000, "is_p2p": False,
                "frames": [{"name": "train", "filename": "train.py", "line": 7 + rank}]}
               for s in range(1, last + 1)]
    return {"version": "2.10", "pg_config": {"0": {"name": "0", "desc": "default_pg",
                                                   "ranks": "[0, 1]"}},
            "pg_status": {"0": {"last_enqueued_collective": last, "last_started_collective": -1,
                                "last_completed_collective": done}},
            "entries": entries}


def run(*argv: str, env: dict | None = None, cwd: Path | None = None
        ) -> tuple[subprocess.CompletedProcess, float]:
    started = time.monotonic()
    done = subprocess.run([*HANGKIT, *argv], capture_output=True, text=True, timeout=BOUND * 2,
                          env={**os.environ, **(env or {})}, cwd=cwd)
    return done, time.monotonic() - started


def one_line(err: str) -> str:
    assert err.count("\n") == 1 and err.startswith("hangkit: error: "), err[:2000]
    assert "Traceback" not in err
    return err


# --- the pickle bomb ------------------------------------------------------------------------

@pytest.mark.timeout(150)
def test_the_pickle_bomb_through_explain_is_one_line_and_exit_2(tmp_path):
    folder = tmp_path / "dumps"
    folder.mkdir()
    (folder / "nccl_trace_rank_0").write_bytes(bomb())
    assert len(bomb()) < 300
    for path in (folder / "nccl_trace_rank_0", folder):
        done, took = run("explain", str(path))
        assert done.returncode == 2, done.stderr[-2000:]
        err = one_line(done.stderr)
        assert "nccl_trace_rank_0" in err and "deeper than" in err
        assert took < BOUND


@pytest.mark.timeout(150)
def test_the_pickle_bomb_through_report_is_one_line_and_exit_2(tmp_path):
    """`hangkit report` once spun past its own deadline on it: the json round trip held the
    GIL, so the thread that gave up could not even say so."""
    (tmp_path / "nccl_trace_rank_0").write_bytes(bomb())
    done, took = run("report", "--out", str(tmp_path), cwd=tmp_path,
                     env={"TORCH_FR_DUMP_TEMP_FILE": str(tmp_path / "nccl_trace_rank_")})
    assert done.returncode == 2, done.stderr[-2000:]
    assert "nccl_trace_rank_0" in one_line(done.stderr)
    assert took < BOUND
    assert not list(tmp_path.glob("*.tar.gz"))


@pytest.mark.timeout(60)
def test_a_shared_value_counts_each_time_it_is_referred_to(tmp_path):
    """A bomb shallower than the depth limit is refused for what it would be written out as,
    at once, while torch's frames shared by every entry are read."""
    shallow = pickle.dumps(functools.reduce(lambda a, _: [a, a], range(25), ["x"]))
    started = time.monotonic()
    with pytest.raises(Refused, match="more than 4,000,000 values written out"):
        plain_data(load_pickle(shallow, DUMP_LIMITS), DUMP_LIMITS)
    assert time.monotonic() - started < BOUND
    frame = {"name": "train", "filename": "train.py", "line": 3}
    dump = torch_dump(0, last=2000, done=1999)
    for e in dump["entries"]:
        e["frames"] = [frame] * 40  # one dict, as torch's pickler memoizes it
    path = tmp_path / "nccl_trace_rank_0"
    path.write_bytes(pickle.dumps(dump))
    assert read_dump(path) == json.loads(json.dumps(dump))


@pytest.mark.timeout(60)
def test_pickles_that_the_c_unpickler_would_crash_or_inflate_on_are_refused():
    deep_key = b"\x80\x02}N" + b"\x85" * 100_000 + b"Ns."  # a tuple 100,000 deep as a key
    with pytest.raises(Refused, match="a dict key that is a tuple"):
        load_pickle(deep_key, DUMP_LIMITS)
    huge_memo = b"\x80\x02]r" + (1 << 30).to_bytes(4, "little") + b"."  # memo index 2**30
    assert load_pickle(huge_memo, DUMP_LIMITS) == []
    with pytest.raises(Refused, match="refusing to load os.system"):
        load_pickle(b"cos\nsystem\n(S'true'\ntR.", DUMP_LIMITS)


# --- structures no dump holds ---------------------------------------------------------------

def circular() -> bytes:
    loop: list = []
    loop.append(loop)
    return pickle.dumps({"entries": loop})


def deep_pickle() -> bytes:
    """{"entries": [[[...]]]} 10,000 deep, by its opcodes (pickle.dumps recurses)."""
    head = b"\x80\x02}X\x07\x00\x00\x00entries"
    deep = b"]" * 10_000 + b"a" * 9_999  # lists, then each appended to the one below
    assert pickle.loads(head + b"]s.") == {"entries": []}
    return head + deep + b"s."


BAD_DUMPS = {
    "circular": (circular, "contains itself"),
    "tuple key": (lambda: pickle.dumps({"entries": [], ("0", "x"): 1}),
                  "a dict key that is a tuple"),
    "deep pickle": (deep_pickle, "deeper than"),
    "deep json": (lambda: b'{"entries": ' + b"[" * 10_000 + b"]" * 10_000 + b"}", "too deeply"),
    "many values": (lambda: b'{"entries": [' + b"0," * 4_000_000 + b"0]}", "more than"),
    "huge counter": (lambda: json.dumps(torch_dump(0) | {"pg_status": {"0": {
        "last_enqueued_collective": 10**18, "last_completed_collective": 0}}}).encode(),
        "not one job's dumps"),
}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", list(BAD_DUMPS))
def test_a_malformed_dump_is_one_line_and_exit_2(kind, tmp_path, capsys):
    make, said = BAD_DUMPS[kind]
    folder = tmp_path / "dumps"
    folder.mkdir()
    (folder / "nccl_trace_rank_0").write_bytes(make())
    started = time.monotonic()
    assert cli(["explain", str(folder)]) == 2
    assert said in one_line(capsys.readouterr().err)
    assert time.monotonic() - started < BOUND


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", ["circular", "tuple key", "deep pickle"])
def test_a_malformed_dump_stops_the_bundle_with_one_line(kind, tmp_path):
    (tmp_path / "nccl_trace_rank_0").write_bytes(BAD_DUMPS[kind][0]())
    env = {**os.environ, "TORCH_FR_DUMP_TEMP_FILE": str(tmp_path / "nccl_trace_rank_")}
    with pytest.raises(UsageError, match=BAD_DUMPS[kind][1]) as caught:
        collect(environ=env, cwd=tmp_path, timeout=3.0)
    assert "nccl_trace_rank_0" in caught.value.one_line()


@pytest.mark.timeout(60)
def test_a_fifo_in_place_of_a_dump_is_refused_not_waited_on(tmp_path, capsys):
    os.mkfifo(tmp_path / "nccl_trace_rank_0")
    assert cli(["explain", str(tmp_path / "nccl_trace_rank_0")]) == 2
    assert "not a regular file" in one_line(capsys.readouterr().err)


# --- dumps where anyone can write -------------------------------------------------------------

@pytest.mark.timeout(120)
def test_a_dump_someone_else_planted_in_a_shared_directory_is_skipped_and_named(tmp_path,
                                                                                capsys):
    if os.getuid() != 0:
        pytest.skip("planting a file of another user takes root (chown)")
    shared = tmp_path / "tmp"
    shared.mkdir()
    shared.chmod(0o1777)  # as /tmp
    (shared / "nccl_trace_rank_0").write_text(json.dumps(torch_dump(0)))
    planted = shared / "nccl_trace_rank_1"
    planted.write_text(json.dumps(torch_dump(1)))
    os.chown(planted, NOBODY, NOBODY)
    (shared / "nccl_trace_rank_2").symlink_to(shared / "nccl_trace_rank_0")
    env = {**os.environ, "TORCH_FR_DUMP_TEMP_FILE": str(shared / "nccl_trace_rank_")}

    bundle = collect(environ=env, cwd=tmp_path, timeout=3.0)
    held = {m for m in bundle.members if m.startswith("flight-recorder/")}
    assert held == {"flight-recorder/nccl_trace_rank_0.json"}
    assert f"skipped {planted}: owned by uid {NOBODY}, not you" in bundle.notes
    assert f"skipped {shared / 'nccl_trace_rank_2'}: a symbolic link" in bundle.notes
    assert f"skipped {planted}: owned by uid {NOBODY}" in bundle.members["README.txt"]

    assert cli(["explain", str(shared)]) == 0
    out = capsys.readouterr().out
    assert f"skipped {planted}: owned by uid {NOBODY}, not you" in out
    assert "Flight Recorder dumps of 1 rank(s)" in out

    done, _ = run("report", "--out", str(tmp_path), cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"hangkit: skipped {planted}: owned by uid {NOBODY}, not you" in done.stderr


# --- reports ------------------------------------------------------------------------------

def real_report():
    """A report with every kind of record in it, built as watch builds one."""
    frames = [Frame("main", "train.py", 40, code="train()"),
              Frame("train", "train.py", 12, code="dist.all_reduce(t)"),
              Frame("all_reduce", "torch/distributed/distributed_c10d.py", 2800)]
    rank = ProcessSnapshot(
        pid=101, ppid=100, rank=0, role="rank", cmdline=["python", "train.py"], state="blocked",
        cpu_percent=0.5, kernel_state="S", syscall=Syscall("futex", 202, "0x7f", "other"),
        session_id=100, threads=[ThreadStack(1, "MainThread", frames, 4242, is_main=True,
                                             owns_gil=False, active=True)],
        note="a note", recording=Recording(rank=0, dump=torch_dump(0)), stacks_from="agent",
        host="node1", age=30.0)
    other = ProcessSnapshot(
        pid=102, ppid=100, rank=1, role="rank", cmdline=["python", "train.py"], state="busy",
        threads=[ThreadStack(1, "MainThread", frames[:2], is_main=True)],
        recording=Recording(rank=1, dump=torch_dump(1, last=2, done=2)), host="node1")
    worker = ProcessSnapshot(pid=103, ppid=101, rank=0, role="dataloader-worker",
                             cmdline=["python"], state="blocked", fetching="17", host="node1")
    ranks = [RankStatus(key=f"rank {r}", rank=r, pid=101 + r, host="node1", status="waiting",
                        step=7, phase="train", phase_seconds=3.0, since_progress=30.0,
                        beat_age=1.0, step_rate=0.5,
                        collective=CollectiveState("torch", "world", "all_reduce", 3, True, 30.0),
                        straggler_score=1.2, fields={"loss": 0.5}, error=None,
                        workers=[WorkerState(0, 103, "fetching", index=17, since=1.0,
                                             seconds=29.0)],
                        extra={"mine": 1}, exit=None) for r in range(2)]
    look = Look(at=30.0, seconds=2.0, samples=3, verdict="hung", capture_seconds=1.0,
                cpu_seconds=0.2, processes=[ProcessLook(101, 0, "rank", "waiting", "train.py:12",
                                                        cpu_percent=0.5, stacks=["train"],
                                                        distinct=1)])
    return build_report(
        reason="no progress for 30 s", command=["mpiexec", "-n", "2", "python", "train.py"],
        idle_seconds=30.0, processes=[rank, other, worker], last_lines=["step 7"],
        context={"job": {"nodes": 1}}, detector="progress", started_at=time.time() - 60,
        capture_seconds=1.5, ranks=ranks,
        events=[StallEvent("stall", "rank 1 stopped", ranks=[1], at=30.0,
                           scores={"1": 2.0}, case="TD-01")],
        looks=[look], nodes=[NodeReport("node1", [0, 1], 55, True, 1.2, 3, None)])


def paths(value, where=()):
    """Every path into a JSON value (containers and leaves), outermost first."""
    yield where
    items = value.items() if isinstance(value, dict) else (
        enumerate(value) if isinstance(value, list) else ())
    for key, item in items:
        yield from paths(item, (*where, key))


def written(where: tuple) -> str:
    return "".join(f"[{k}]" if isinstance(k, int) else f".{k}" for k in where).lstrip(".")


def mangled(value):
    """A value of another type."""
    if isinstance(value, bool):
        return "yes"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return 12345
    if value is None:
        return [True]  # no optional field takes a list of true/false
    return "text" if isinstance(value, dict | list) else None


# Free-form data, of any type inside: a report's context, a dump, a beat's fields and extras.
FREE = {"context", "dump", "fields", "extra"}


@pytest.mark.timeout(300)
def test_the_wrong_type_in_any_field_is_one_line_from_explain_and_named_by_show_report(
        tmp_path, capsys):
    base = real_report().to_json()
    path = tmp_path / JSON_NAME
    checked = free = 0
    for where in paths(base):
        if not where:
            continue
        doc = copy.deepcopy(base)
        target = functools.reduce(lambda d, k: d[k], where[:-1], doc)
        target[where[-1]] = mangled(target[where[-1]])
        path.write_text(json.dumps(doc))
        code = cli(["explain", str(path)])
        captured = capsys.readouterr()
        assert "Traceback" not in captured.err
        view = show_report(path)
        shown = view.text() + "".join(view.html_parts()) + "".join(map(str, view.rank_rows()))
        if FREE & set(where[:-1]):  # anything goes in there: read, never a traceback
            assert code in (0, 2), (where, captured.err)
            if code == 2:
                one_line(captured.err)
            free += 1
            continue
        assert code == 2, (where, captured.out[-500:])
        assert written(where) in one_line(captured.err), where
        assert "Could not read or show:" in shown and written(where) in shown, where
        checked += 1
    assert checked > 100 and free > 10, (checked, free)


@pytest.mark.timeout(60)
def test_show_report_shows_mangled_leaves_and_says_what_it_could_not(tmp_path):
    """A number field holding text once loaded, then raised ValueError (Unknown format code
    'f') when displayed."""
    write_report(real_report(), tmp_path / "job")
    doc = json.loads((tmp_path / "job" / JSON_NAME).read_text())
    doc["ranks"][0]["since_progress"] = "long ago"
    doc["ranks"][1]["collective"]["seconds"] = "30"
    doc["processes"][0]["cpu_percent"] = [1]
    doc["looks"][0]["processes"][0]["cpu_percent"] = "high"
    (tmp_path / "job" / JSON_NAME).write_text(json.dumps(doc))
    view = show_report(tmp_path / "job")
    text = view.text()
    assert "no progress for 30 s" in text and "rank 1" in text
    for field in ("ranks[0].since_progress: text where a number belongs",
                  "ranks[1].collective.seconds", "processes[0].cpu_percent",
                  "looks[0].processes[0].cpu_percent"):
        assert field in text, text
    assert any("Could not read or show" in part for part in [view.missing_html()])
    assert [row[0] for row in view.rank_rows()] == ["rank 0", "rank 1"]
    assert [b.get_height() for b in view.figure().axes[0].patches] == [7, 7]
    with pytest.raises(UsageError, match="processes\\[0\\].cpu_percent: a list where a "
                       "number belongs \\(and 3 more\\)"):
        read_report(tmp_path / "job")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", ["deep", "a list", "not json"])
def test_a_report_that_is_no_report_is_one_line_from_explain_and_report(kind, tmp_path, capsys):
    report = tmp_path / "job"
    report.mkdir()
    content = {"deep": '{"reason": ' + "[" * 10_000 + "]" * 10_000 + "}",
               "a list": "[1, 2]", "not json": "{'reason': "}[kind]
    (report / JSON_NAME).write_text(content)
    assert cli(["explain", str(report)]) == 2
    assert "not a hang report" in one_line(capsys.readouterr().err)
    env = {**os.environ, "TORCH_FR_DUMP_TEMP_FILE": str(tmp_path / "nccl_trace_rank_")}
    with pytest.raises(UsageError, match="not a hang report"):
        collect(hang_report=report, environ=env, cwd=tmp_path, timeout=3.0)
    with pytest.raises(UsageError, match="not a hang report"):
        show_report(report)


@pytest.mark.timeout(180)
def test_a_200_mb_reason_is_cut_when_shown(tmp_path, capsys):
    doc = real_report().to_json()
    doc["reason"] = "@" * 200_000_000
    (tmp_path / JSON_NAME).write_text(json.dumps(doc))
    del doc
    assert cli(["explain", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    first = out.splitlines()[0]
    assert first.endswith(f"... ({200_000_000 - SHOWN_CHARACTERS:,} characters cut)")
    assert len(out) < 20_000
    view = show_report(tmp_path)
    assert max(len(line) for line in view.text().splitlines()) < 2 * SHOWN_CHARACTERS
    assert all(len(part) < 50_000 for part in view.html_parts())


@pytest.mark.timeout(60)
def test_control_characters_in_a_report_are_shown_not_obeyed(tmp_path, capsys):
    doc = real_report().to_json()
    doc["reason"] = "stuck\x1b]0;pwned\x07\x1b[2J"  # retitle the terminal, clear the screen
    (tmp_path / JSON_NAME).write_text(json.dumps(doc))
    assert cli(["explain", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out
    assert "stuck\\x1b]0;pwned\\x07\\x1b[2J" in out.splitlines()[0]
    assert "\x1b" not in show_report(tmp_path).text()


@pytest.mark.timeout(60)
def test_json_limits_count_values_and_depth_without_recursing():
    limits = DUMP_LIMITS
    assert load_json(b'{"a": [1, 2, {"b": "\\ud800"}]}', limits) == {"a": [1, 2, {"b": "\\ud800"}]}
    with pytest.raises(Refused, match="deeper than 32"):
        load_json(b"[" * 40 + b"]" * 40, limits)
    with pytest.raises(Refused, match="not JSON"):
        load_json(b"{", limits)


@pytest.mark.timeout(120)
def test_a_runaway_recursion_stack_makes_a_report_every_reader_takes(tmp_path):
    """watch captures what the process has: 3,000 frames of recursion. The report keeps the
    outermost and innermost, says how many it left out, and reads back, bundle included."""
    from hangkit.bundle import collect
    from hangkit.monitor.report import build_report, read_report, write_report
    from hangkit.records import Frame, ProcessSnapshot, ProcessState, Role, ThreadStack

    frames = [Frame(function="main", file="train.py", line=1)] + [
        Frame(function="walk", file="train.py", line=7) for _ in range(3000)] + [
        Frame(function="wait", file="threading.py", line=320)]
    deep = ProcessSnapshot(pid=11, ppid=1, rank=0, role=Role.RANK, cmdline=["python"],
                           state=ProcessState.BLOCKED,
                           threads=[ThreadStack(id=1, name="MainThread", frames=frames,
                                                is_main=True)])
    report = build_report(reason="r", command=["python"], idle_seconds=1.0, processes=[deep],
                          last_lines=[], context={})
    kept = report.processes[0].threads[0].frames
    assert len(kept) < 200 and kept[0].function == "main" and kept[-1].function == "wait"
    assert any("frames not shown" in f.function for f in kept)
    write_report(report, tmp_path / "r")
    _, again = read_report(tmp_path / "r")
    assert again.processes[0].threads[0].frames[-1].function == "wait"
    bundle = collect(hang_report=tmp_path / "r", cwd=tmp_path, environ={}, timeout=60)
    assert any(name.endswith("hang-report.json") for name in bundle.members), bundle.summary()
