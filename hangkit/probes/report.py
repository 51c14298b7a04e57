"""The doctor's output: a table of probes by ranks, each problem's detail and advice below it,
and the JSON file. Pure functions of ProbeResult records."""

from __future__ import annotations

import json
import socket
from pathlib import Path

from hangkit.files import write_atomic
from hangkit.records import SCHEMA, ProbeResult
from hangkit.text import iso_time, ranks_phrase

CELL = {"ok": "ok", "warn": "WARN", "fail": "FAIL", "timeout": "TIMEOUT", "skipped": "skip"}
PROBLEMS = ("fail", "timeout", "warn")


def exit_code(results: list[ProbeResult]) -> int:
    return 1 if any(r.status in ("fail", "timeout") for r in results) else 0


def render(results: list[ProbeResult]) -> list[str]:
    names = list(dict.fromkeys(r.name for r in results))
    ranks = sorted({r.rank for r in results if r.rank is not None})
    by_cell = {(r.name, r.rank): r for r in results}
    width = max(len(n) for n in names) if names else 5
    if ranks:
        head = f"{'probe':<{width}}  " + " ".join(f"{'rank ' + str(k):>8}" for k in ranks)
        rows = [f"{n:<{width}}  " + " ".join(f"{_cell(by_cell.get((n, k))):>8}" for k in ranks)
                for n in names]
    else:
        head = f"{'probe':<{width}}  {'result':<8} seconds  detail"
        rows = [f"{n:<{width}}  {_cell(r):<8} {r.seconds:7.1f}  {_short(r.detail)}"
                for n in names if (r := by_cell.get((n, None)))]
    lines = [head, *rows]
    problems = _problems(results)
    if problems:
        lines += ["", "Problems:"] + problems
    failed = sum(r.status in ("fail", "timeout") for r in results)
    warned = sum(r.status == "warn" for r in results)
    lines += ["", f"{len(names)} probe(s){f' on {len(ranks)} rank(s)' if ranks else ''}: "
              f"{failed} failed or timed out, {warned} warning(s)"]
    return lines


def _cell(r: ProbeResult | None) -> str:
    return CELL.get(r.status, r.status) if r else "-"


def _short(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _problems(results: list[ProbeResult]) -> list[str]:
    """Each distinct problem once, with the ranks that have it."""
    grouped: dict[tuple, list[ProbeResult]] = {}
    for r in results:
        # A skipped probe with advice (mpi4py missing) is worth showing; others are noise.
        if r.status in PROBLEMS or (r.status == "skipped" and r.advice):
            grouped.setdefault((r.name, r.status, r.detail, r.advice), []).append(r)
    lines = []
    for (name, status, detail, advice), rs in sorted(
            grouped.items(), key=lambda kv: (PROBLEMS + ("skipped",)).index(kv[0][1])):
        ranks = [r.rank for r in rs if r.rank is not None]
        where = f" ({ranks_phrase(ranks)})" if ranks else ""
        lines.append(f"  [{CELL[status]}] {name}{where}: {detail}")
        if advice:
            lines.append(f"      advice: {advice}")
    return lines


def write_json(results: list[ProbeResult], path: Path, *, ranks: int | None, timeout: float,
               seconds: float) -> None:
    document = {
        "schema": SCHEMA,
        "probes": [r.to_json() for r in results],
        "ranks": ranks, "timeout": timeout, "seconds": round(seconds, 3),
        "host": socket.gethostname(), "finished_at": iso_time(),
        "exit_code": exit_code(results),
    }
    write_atomic(path, json.dumps(document, indent=2) + "\n")
