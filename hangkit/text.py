"""Small pieces of text every layer writes alike: rank sets, timestamps, a message's line.

Stdlib only: ranks, probes, the monitor and the notebook all use it.
"""

from __future__ import annotations

import time
from collections.abc import Iterable


def format_ranks(ranks: Iterable[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2,5,7,8': runs of three or more as a range."""
    parts, ordered = [], sorted(set(ranks))
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        if j - i >= 2:
            parts.append(f"{ordered[i]}-{ordered[j]}")
        else:
            parts.extend(str(r) for r in ordered[i:j + 1])
        i = j + 1
    return ",".join(parts)


def ranks_phrase(ranks: Iterable[int]) -> str:
    """'rank 2', 'ranks 0-3': what a sentence about ranks starts with."""
    ranks = set(ranks)
    return ("rank " if len(ranks) == 1 else "ranks ") + format_ranks(ranks)


def who(ranks: Iterable[int], pids: Iterable[int] = ()) -> str:
    """The ranks when there are any, else the processes: 'ranks 0,1,3', 'pid 1234'."""
    ranks, pids = list(ranks), sorted(set(pids))
    if ranks:
        return ranks_phrase(ranks)
    return ("pid " if len(pids) == 1 else "pids ") + ",".join(map(str, pids))


def iso_time(t: float | None = None) -> str:
    """Local time with its offset, to the second: '2026-12-01T21:43:08+0000'."""
    return time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(time.time() if t is None else t))


# What a value may take on a screen: a path, a frame, a reason of a few lines. A file someone
# else wrote may hold a value of any length (a 200 MB reason); it is shown cut, saying so.
SHOWN_CHARACTERS = 1000


def cut(text: str, limit: int = SHOWN_CHARACTERS) -> str:
    """text as it is shown: its first `limit` characters and '... (N characters cut)' when
    longer. The one place a long value is cut for showing."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text) - limit:,} characters cut)"


def first_line(text: str, default: str = "") -> str:
    """The first line of text that is not blank, stripped."""
    return next((line.strip() for line in text.splitlines() if line.strip()), default)


def last_line(text: str, default: str = "") -> str:
    """The last line of text that is not blank, stripped: a traceback's summary, a process's
    last words."""
    return next((line.strip() for line in reversed(text.splitlines()) if line.strip()), default)
