"""Benchmark of reading hostile files: how long a Flight Recorder dump built to hang its reader
takes to become a one-line error. Each figure is printed with its ratio to its goal.

1. The pickle bomb: some 260 bytes, a list of two references to a list of two references ... 40
   levels deep (`functools.reduce(lambda a, _: [a, a], range(40), ["x"])`, pickled: the memo
   keeps it tiny). The reader before hangkit/safeload.py (pickle.Unpickler, then a json round
   trip) expanded it to 2**40 lists and never finished. Goal: < 2 s to the error.
2. A JSON dump nested 10,000 deep (json.loads alone raises RecursionError; a renderer that
   recursed would crash). Goal: < 2 s to the error.
Each through `hangkit explain FILE` as a subprocess (Python's start and hangkit's imports
included: the time a user waits), the worst of RUNS runs, and through the in-process reader
(flight_recorder.dumps.read_dump), the worst of RUNS.
3. For scale, not judged: a real-sized dump (2,000 entries of 40 frames, the frames shared as
   torch's pickler shares them) read by read_dump, against the reader before on the same file
   (both with the parse of its entries read_dump does).

Run from the repository root:  .venv/bin/python benchmarks/bench_hostile_dump.py [--runs N]

Always exits 0; a missed goal is printed as MISSED. Every run has a deadline, and every process
started here is ended before the script ends (checked afterwards by an environment marker).
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import pickle
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchrun import job_env, judged, kill_marked, load_line, measure_all, print_summary

from hangkit.errors import UsageError
from hangkit.flight_recorder.dumps import parsed, read_dump
from hangkit.records import Recording

GOAL = 2.0
RUN_DEADLINE = 60.0  # one `hangkit explain`; ten times what the goal allows and more


def bomb() -> bytes:
    return pickle.dumps(functools.reduce(lambda a, _: [a, a], range(40), ["x"]))


def deep_json() -> bytes:
    return b'{"entries": ' + b"[" * 10_000 + b"]" * 10_000 + b"}"


def through_explain(path: Path, runs: int) -> float:
    """The worst wall time of `hangkit explain PATH` to its exit; it must be 2, one line."""
    worst = 0.0
    for _ in range(runs):
        started = time.monotonic()
        done = subprocess.run([sys.executable, "-m", "hangkit", "explain", str(path)],
                              capture_output=True, text=True, timeout=RUN_DEADLINE, env=job_env())
        took = time.monotonic() - started
        if done.returncode != 2 or done.stderr.count("\n") != 1:
            raise RuntimeError(f"exit {done.returncode}, not one line: {done.stderr[-500:]!r}")
        worst = max(worst, took)
    return worst


def in_process(path: Path, runs: int) -> float:
    worst = 0.0
    for _ in range(runs):
        started = time.monotonic()
        try:
            read_dump(path)
        except UsageError:
            worst = max(worst, time.monotonic() - started)
        else:
            raise RuntimeError(f"{path} was read as a dump")
    return worst


def figure(name: str, content: bytes, runs: int, workdir: Path) -> list[tuple[bool, str]]:
    path = workdir / "nccl_trace_rank_0"
    path.write_bytes(content)
    out = []
    for how, took in (("`hangkit explain FILE`", through_explain(path, runs)),
                      ("the in-process reader", in_process(path, runs))):
        out.append(judged(f"Parsing a hostile dump ({name}, {len(content):,} bytes, {how}, "
                          f"worst of {runs})", f"{took:.3f} s to a one-line error",
                          f"< {GOAL:g} s", took / GOAL, took < GOAL))
    return out


def figure_real(workdir: Path) -> tuple[None, str]:
    frames = [{"name": f"f{i}", "filename": f"/site-packages/torch/m{i}.py", "line": i}
              for i in range(40)]
    entries = [{"record_id": s, "pg_id": 0, "process_group": ("0", "default_pg"),
                "collective_seq_id": s, "p2p_seq_id": 0, "op_id": s,
                "profiling_name": "nccl:all_reduce", "time_created_ns": 1, "input_sizes": [[10]],
                "input_dtypes": ["Float"], "output_sizes": [[10]], "output_dtypes": ["Float"],
                "state": "completed", "retired": True, "timeout_ms": 600000, "is_p2p": False,
                "frames": frames} for s in range(1, 2001)]
    dump = {"version": "2.10", "pg_config": {"0": {"name": "0", "desc": "default_pg",
                                                   "ranks": "[0, 1]"}},
            "pg_status": {"0": {"last_enqueued_collective": 2000,
                                "last_completed_collective": 2000}}, "entries": entries}
    path = workdir / "nccl_trace_rank_1"
    data = pickle.dumps(dump)
    path.write_bytes(data)
    started = time.monotonic()
    read_dump(path)
    new = time.monotonic() - started

    class Plain(pickle.Unpickler):  # the reader before: refuses classes, then a json round trip
        def find_class(self, module, name):
            raise pickle.UnpicklingError(name)

    started = time.monotonic()
    parsed(Recording(rank=1, dump=json.loads(json.dumps(Plain(io.BytesIO(data)).load(),
                                                        default=str))))
    old = time.monotonic() - started
    return None, (f"Reading a real-sized dump (2,000 entries of 40 shared frames, "
                  f"{len(data):,} bytes): {new:.3f} s with read_dump, {old:.3f} s with the "
                  f"reader before (ratio {new / old:.1f})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    runs = parser.parse_args().runs
    started = time.monotonic()
    print(load_line())
    figures = [
        ("1. the pickle bomb", lambda workdir: figure("the pickle bomb", bomb(), runs, workdir)),
        ("2. JSON nested 10,000 deep",
         lambda workdir: figure("JSON nested 10,000 deep", deep_json(), runs, workdir)),
        ("3. a real-sized dump, for scale", figure_real),
    ]
    with tempfile.TemporaryDirectory(prefix="hk-bench-hostile-") as tmp:
        results = measure_all(figures, Path(tmp), end=kill_marked)
    print_summary(results, started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
