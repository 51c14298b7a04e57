"""Benchmark of hangkit on the jobs users run: plain training scripts on real frameworks, none of
which imports hangkit (tests/programs/frameworks/: DDP under torchrun and mpiexec, FSDP2,
Lightning's own launcher, Accelerate, the HF Trainer, a rank's script named torchrun_*, a
Lightning rank's stuck DataLoader worker, uneven shards, torchrun with a node missing, and a
cold torch.compile that is no hang), each run once under `hangkit watch --timeout 5`. Printed
as a table, one row a program: its exit, the ranks, how many sent their Flight Recorder dump to
the report, the verdict and the ranks it names, and whether that is what the program must get
(tests/programs/frameworks/cases.py; for the compile: exit 0 and no report). Three figures:

1. Ranks whose dump reached the report, over the programs whose ranks started. Goal: all.
2. Verdicts right (the kind, and the odd rank(s) named). Goal: all of them, in one run.
3. False kills of a cold torch.compile start-up (a fresh inductor cache each run) under
   `--timeout 5` while two busy processes hold both cores: COMPILE_RUNS runs. Goal: 0.

Run from the repository root:  .venv/bin/python benchmarks/bench_frameworks.py [COMPILE_RUNS]
(about 3 minutes, and 40-60 s more per compile run; COMPILE_RUNS defaults to 20)

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
    # torchrun waiting for a node prints nothing: the start-up timeout is the one that calls it.
    options = ["--startup-timeout", "10"] if case.verdict == "TD-05" else []
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "hangkit", "watch", "--timeout", "5",
                           "--grace", "2", *options, "--report-dir", str(scratch / "report"),
                           "--", *argv],
                          env=job_env(TMPDIR=str(tmp), **env), capture_output=True,
                          timeout=TIMEOUT, cwd=scratch)
    row = {"case": case.name, "exit": done.returncode,
           "seconds": round(time.monotonic() - started, 1), "ranks": 0, "dumps": 0,
           "verdict": "-", "named": "-", "right": False}
    report_file = scratch / "report" / "hang-report.json"
    if not case.verdict:  # no hang: it must end by itself, with no report
        row.update(verdict="none", right=done.returncode == 0 and not report_file.exists())
        return row
    if not report_file.exists():
        return row
    report = json.loads(report_file.read_text())
    ranks = [p for p in report["processes"] if p["role"] == "rank"]
    first = (report.get("diagnosis") or [{}])[0]
    row.update(ranks=len(ranks), dumps=sum(1 for p in ranks
                                           if (p.get("recording") or {}).get("dump")),
               verdict=first.get("kind", "-"), named=first.get("ranks", "-"))
    started_ranks = 0 if case.verdict == "TD-05" else case.world  # none start there
    row["right"] = (row["verdict"] == case.verdict and tuple(first.get("ranks", ())) == case.odd
                    and row["ranks"] == started_ranks)
    return row


def false_kills(runs: int, scratch: Path) -> tuple[int, list[float]]:
    """The cold compile `runs` times while two busy processes hold both cores: how many
    times watch ended it, and each run's seconds."""
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"], env=job_env())
            for _ in range(2)]
    killed, seconds = 0, []
    try:
        for i in range(runs):
            row = run_case(CASES["compile"], scratch / f"compile-{i}")
            killed += not row["right"]
            seconds.append(row["seconds"])
            print(f"  compile run {i + 1}: exit {row['exit']} in {row['seconds']} s", flush=True)
    finally:
        end_all(*hogs)
    return killed, seconds


def main() -> int:
    runs = int(sys.argv[1]) if sys.argv[1:] else 20
    started = time.monotonic()
    print(load_line())
    rows = []
    with tempfile.TemporaryDirectory(prefix="hk-bench-frameworks-") as tmp:
        try:
            print(f"\n{runs} cold torch.compile start-ups under --timeout 5, 2 busy processes:")
            killed, seconds = false_kills(runs, Path(tmp))
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
    hung = [r for r in rows if CASES[r["case"]].verdict not in ("", "TD-05")]
    ranks = sum(r["ranks"] for r in hung)
    dumps = sum(r["dumps"] for r in hung)
    expected = sum(CASES[r["case"]].world for r in hung)
    right = sum(r["right"] for r in rows)
    results = [
        judged("ranks whose Flight Recorder dump reached the report", f"{dumps} of {ranks} "
               f"({expected} expected)", "all", dumps / expected, dumps == ranks == expected),
        judged("verdicts right, in one run", f"{right} of {len(rows)}", "all",
               right / len(rows), right == len(rows)),
        judged(f"false kills of a cold torch.compile start-up under load (runs of "
               f"{min(seconds, default=0):.0f}-{max(seconds, default=0):.0f} s)",
               f"{killed} in {runs}", "0", float(killed), killed == 0),
    ]
    print()
    for _met, line in results:
        print(line)
    print_summary([(line, met) for met, line in results], started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
