"""Benchmark of hangkit on the jobs users run: plain training scripts on real frameworks, none of
which imports hangkit (tests/programs/frameworks/: DDP under torchrun and mpiexec, FSDP2,
Lightning's own launcher, Accelerate, the HF Trainer), each hung for real and run once under
`hangkit watch --timeout 5`. Printed as a table, one row a program: the ranks, how many sent
their Flight Recorder dump to the report, the verdict and the ranks it names, and whether that
is the verdict the program must get (tests/programs/frameworks/cases.py). Two figures:

1. Ranks whose dump reached the report, over every program. Goal: all of them.
2. Verdicts right (the kind, and the odd rank(s) named). Goal: all of them, in one run.

Run from the repository root:  .venv/bin/python benchmarks/bench_frameworks.py   (2-3 minutes)

Always exits 0; a missed goal is printed as MISSED. Every process started here is ended before
the script ends (checked afterwards by an environment marker).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchrun import end_all, job_env, judged, load_line, print_summary

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "programs" / "frameworks"))
from cases import CASES, Case, command  # noqa: E402

TIMEOUT = 240  # seconds one watched run may take, start-up included


def run_case(case: Case, scratch: Path) -> dict:
    """One watched run: its row of the table."""
    tmp = scratch / "tmp"
    tmp.mkdir(parents=True)
    argv, env = command(case, scratch)
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "hangkit", "watch", "--timeout", "5",
                           "--grace", "2", "--report-dir", str(scratch / "report"), "--", *argv],
                          env=job_env(TMPDIR=str(tmp), **env), capture_output=True,
                          timeout=TIMEOUT, cwd=scratch)
    row = {"case": case.name, "exit": done.returncode,
           "seconds": round(time.monotonic() - started, 1), "ranks": 0, "dumps": 0,
           "verdict": "-", "named": "-", "right": False}
    report_file = scratch / "report" / "hang-report.json"
    if not report_file.exists():
        return row
    report = json.loads(report_file.read_text())
    ranks = [p for p in report["processes"] if p["role"] == "rank"]
    first = (report.get("diagnosis") or [{}])[0]
    row.update(ranks=len(ranks), dumps=sum(1 for p in ranks
                                           if (p.get("recording") or {}).get("dump")),
               verdict=first.get("kind", "-"), named=first.get("ranks", "-"))
    row["right"] = (row["verdict"] == case.verdict and tuple(first.get("ranks", ())) == case.odd
                    and row["ranks"] == case.world)
    return row


def main() -> int:
    started = time.monotonic()
    print(load_line())
    rows = []
    with tempfile.TemporaryDirectory(prefix="hk-bench-frameworks-") as tmp:
        try:
            for name, case in CASES.items():
                try:
                    rows.append(run_case(case, Path(tmp) / name))
                except subprocess.TimeoutExpired:
                    rows.append({"case": name, "exit": "timeout", "seconds": TIMEOUT,
                                 "ranks": 0, "dumps": 0, "verdict": "-", "named": "-",
                                 "right": False})
        finally:
            end_all()
    print(f"\n{'program':16} {'exit':>5} {'s':>6} {'ranks':>5} {'dumps':>5}  {'verdict':8} "
          f"{'names':8} right")
    for r in rows:
        print(f"{r['case']:16} {r['exit']!s:>5} {r['seconds']:>6} {r['ranks']:>5} "
              f"{r['dumps']:>5}  {r['verdict']:8} {str(r['named']):8} "
              f"{'yes' if r['right'] else 'NO'}")
    ranks = sum(r["ranks"] for r in rows)
    dumps = sum(r["dumps"] for r in rows)
    expected = sum(c.world for c in CASES.values())
    right = sum(r["right"] for r in rows)
    results = [
        judged("ranks whose Flight Recorder dump reached the report", f"{dumps} of {ranks} "
               f"({expected} expected)", "all", dumps / expected, dumps == ranks == expected),
        judged("verdicts right, in one run", f"{right} of {len(rows)}", "all",
               right / len(rows), right == len(rows)),
    ]
    print()
    for _met, line in results:
        print(line)
    print_summary([(line, met) for met, line in results], started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
