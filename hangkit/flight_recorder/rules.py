"""Diagnosis rules on the merged Flight Recorder view: they run ahead of the stack rules, because
the recorder sees the collectives DDP and FSDP issue from C++, and NCCL's that a rank's Python
line no longer shows.

- TD-02: ranks recorded different ops, sizes or dtypes at the same sequence number.
- TD-01 (TD-10 in a subgroup): some ranks issued a collective that others never did. The others
  are named with what their stacks show them doing instead.
- TD-09 (NCCL): every rank issued it, and the recorded state says who never started it.
- all-in-collective: every rank that answered waits in it, and the ranks that did not answer
  are named.
"""

from __future__ import annotations

from hangkit.flight_recorder.dumps import Entry, parsed
from hangkit.flight_recorder.view import GroupView, Row, of_processes
from hangkit.monitor.advice import ADVICE
from hangkit.monitor.stacks import (
    describe_state,
    innermost_user_frame,
    is_user_frame,
    main_location,
    rank_branch,
    short_path,
    source_line,
)
from hangkit.records import Diagnosis, Frame, ProcessSnapshot, ProcessState, ThreadStack
from hangkit.text import ranks_phrase

# Where a collective issued from the backward pass comes from, by its op.
_BACKWARD_PURPOSE = {"all_reduce": "DDP's gradient bucket",
                     "reduce_scatter_tensor_coalesced": "FSDP's gradient reduce-scatter",
                     "_reduce_scatter_base": "FSDP's gradient reduce-scatter",
                     "reduce_scatter": "FSDP's gradient reduce-scatter"}


def from_recordings(processes: list[ProcessSnapshot]) -> list[Diagnosis]:
    """The recorder's findings for one capture: from the ranks' recordings in `processes`, and
    their stacks for what the ranks that did not issue a collective are doing instead."""
    views, ranks = of_processes(processes)
    return diagnose_views(views, ranks)


def diagnose_views(views: list[GroupView], ranks: dict[int, ProcessSnapshot] | None = None
                   ) -> list[Diagnosis]:
    ranks = ranks or {}
    found = []
    for view in views:
        row = view.stuck
        if row is None:
            continue
        if row.mismatch:
            found.append(_mismatch(view, row, ranks))
        elif set(row.issued) != set(view.dumped):
            found.append(_never_issued(view, row, ranks))
        elif row.started and set(row.started) != set(row.issued):
            found.append(_not_started(view, row, ranks))
        elif view.missing or not row.completed:
            found.append(_all_waiting(view, row, ranks))
    return found


def _mismatch(view: GroupView, row: Row, ranks: dict[int, ProcessSnapshot]) -> Diagnosis:
    # Each side with where it issued its call, and the rank-dependent branch the odd ones
    # took: their line is the one to look at.
    odd = odd_ones_out(list(row.mismatch.values()))
    uneven = _uneven(view, row, ranks, odd)
    if uneven is not None:
        return uneven
    parts = "; ".join(
        f"{ranks_phrase(r)} {shape}"
        f"{_where(row.entries.get(r[0]), ranks.get(r[0]), branch=r[0] in odd)}"
        for shape, r in sorted(row.mismatch.items(), key=lambda kv: len(kv[1])))
    backend = row.entry.backend if row.entry else ""
    outcome = {
        "gloo": (" gloo fails such a collective on some ranks (\"Received data size doesn't "
                 "match expected size\", or \"Connection closed by peer\" once another rank "
                 "has gone) and may complete it on others with wrong data."),
        "nccl": " NCCL waits in it until its timeout, or completes it with wrong data.",
    }.get(backend, "")
    return Diagnosis(
        kind="TD-02",
        summary=f"Ranks disagree on collective #{row.seq} of {view.group.label}: {parts}.{outcome}",
        advice=ADVICE["TD-02"], ranks=odd)


def _uneven(view: GroupView, row: Row, ranks: dict[int, ProcessSnapshot], odd: list[int]
            ) -> Diagnosis | None:
    """TD-06: the others wait in a training step's collective (DDP's or FSDP's, issued inside
    forward or backward) while the odd ranks, under no rank-dependent branch, are in another:
    they ran out of batches. How many steps each side finished is counted in its recorder:
    the collectives like the others' current one (same op and sizes) before it."""
    rest = [r for r in row.issued if r not in odd and r in row.entries]
    if not odd or not rest or any(r not in row.entries for r in odd):
        return None
    step, other = row.entries[rest[0]], row.entries[odd[0]]
    if not _in_training_step(step, ranks.get(rest[0])) or \
            _in_training_step(other, ranks.get(odd[0])) or \
            rank_branch(_site_frame(other, ranks.get(odd[0]))):
        return None
    done, partial = _steps_before(ranks.get(odd[0]), view.group.name, step, row.seq)
    if done is None:
        return None
    at_least = "at least " if partial else ""
    verb = "waits" if len(rest) == 1 else "wait"
    return Diagnosis(
        kind="TD-06",
        summary=(f"Uneven inputs: {ranks_phrase(odd)} ran out of batches after {at_least}"
                 f"{done} training steps and {'waits' if len(odd) == 1 else 'wait'} in "
                 f"{other.op} #{row.seq} of {view.group.label}"
                 f"{_where(other, ranks.get(odd[0]))}, while {ranks_phrase(rest)} {verb} in "
                 f"{step.op} #{row.seq} of their step {done + 1}"
                 f"{_where(step, ranks.get(rest[0]))}"),
        advice=ADVICE["TD-06"], ranks=odd, pids=[ranks[r].pid for r in odd if r in ranks])


_TRAINING_FILES = ("torch/distributed/fsdp/", "torch/nn/parallel/distributed.py")


def _issuing_frames(entry: Entry | None, p: ProcessSnapshot | None) -> tuple[list[Frame], bool]:
    """(where the rank issued the entry, whether the recorder kept that stack): the recorder's
    stack where it kept one, else the rank's own, since gloo blocks where it issued (NCCL's
    rank has moved on: none)."""
    frames = list(entry.frames) if entry else []
    thread = p.main_thread if p is not None else None
    if frames or entry is None or entry.backend == "nccl" or thread is None:
        return frames, bool(frames)
    return list(thread.frames), False


def _in_training_step(entry: Entry, p: ProcessSnapshot | None) -> bool:
    """Issued by DDP or FSDP inside forward or backward."""
    return any(not f.native and (f.function.endswith("backward") and not is_user_frame(f)
                                 or any(t in f.file for t in _TRAINING_FILES))
               for f in _issuing_frames(entry, p)[0])


def _site_frame(entry: Entry, p: ProcessSnapshot | None) -> Frame | None:
    frames = _issuing_frames(entry, p)[0]
    return innermost_user_frame(ThreadStack(0, None, frames)) if frames else None


def _steps_before(p: ProcessSnapshot | None, group: str, step: Entry, seq: int
                  ) -> tuple[int | None, bool]:
    """(how many collectives like `step` the rank issued in the group before seq, whether its
    recorder's buffer no longer reaches back to the group's first)."""
    found = parsed(p.recording) if p is not None and p.recording is not None else None
    if found is None:
        return None, False
    mine = [e for e in found[1] if e.group == group and not e.p2p and e.seq < seq]
    same = sum(1 for e in mine if e.op == step.op and e.input_sizes == step.input_sizes)
    return same, bool(mine) and min(e.seq for e in mine) > 1


def odd_ones_out(sets: list[list[int]]) -> list[int]:
    """The ranks outside the largest set (all of them when no set is the largest)."""
    sizes = sorted((len(s) for s in sets), reverse=True)
    if len(sizes) > 1 and sizes[0] == sizes[1]:
        return sorted(r for s in sets for r in s)
    largest = max(sets, key=len)
    return sorted(r for s in sets if s is not largest for r in s)


def _never_issued(view: GroupView, row: Row, ranks: dict[int, ProcessSnapshot]) -> Diagnosis:
    waiting = [r for r in row.issued if r not in row.completed]
    absent = [r for r in view.dumped if r not in row.issued]
    kind = "TD-01" if view.group.name == "0" else "TD-10"
    return Diagnosis(
        kind=kind,
        summary=(f"{_subject(waiting or row.issued)} in {row.op} #{row.seq} of "
                 f"{view.group.label}{_issued_from(row, ranks)}; "
                 f"{ranks_phrase(absent)} never issued it{_instead(view, absent, ranks)}"
                 + _no_dump(view, ranks)),
        advice=ADVICE[kind], ranks=absent,
        pids=[ranks[r].pid for r in absent if r in ranks])


def _not_started(view: GroupView, row: Row, ranks: dict[int, ProcessSnapshot]) -> Diagnosis:
    late = [r for r in row.issued if r not in row.started]
    return Diagnosis(
        kind="TD-09",
        summary=(f"Every rank of {view.group.label} issued {row.op} #{row.seq}"
                 f"{_issued_from(row, ranks)}; it started on {ranks_phrase(row.started)} but "
                 f"not on {ranks_phrase(late)}: their GPU work before it has not finished. "
                 + "; ".join(f"rank {r} is {_doing(r, ranks) or 'not seen'}" for r in late)),
        advice=ADVICE["TD-09"], ranks=late, pids=[ranks[r].pid for r in late if r in ranks])


def _all_waiting(view: GroupView, row: Row, ranks: dict[int, ProcessSnapshot]) -> Diagnosis:
    """Every rank that sent a dump issued it and none completed it: the ranks without a dump
    are the ones to look at, with what their stacks show."""
    unknown = "; ".join(f"rank {r} sent no recorder dump ({missing_reason(ranks.get(r))})"
                        + (f": it is {_doing(r, ranks)}" if r in ranks else "")
                        for r in view.missing)
    return Diagnosis(
        kind="all-in-collective",
        summary=(f"{_subject(row.issued)} in {row.op} #{row.seq} of {view.group.label}"
                 f"{_issued_from(row, ranks)}, and no rank completed it"
                 + (f"; {unknown}" if unknown else "")),
        advice=ADVICE["all-in-collective"], ranks=view.missing or row.issued,
        pids=[ranks[r].pid for r in view.missing if r in ranks])


def _subject(waiting: list[int]) -> str:
    phrase = ranks_phrase(waiting)
    return f"{phrase[0].upper()}{phrase[1:]} {'waits' if len(waiting) == 1 else 'wait'}"


def _issued_from(row: Row, ranks: dict[int, ProcessSnapshot]) -> str:
    """' (DDP's gradient bucket; from `loss.backward()` at train.py:36)': where the waiting
    ranks issued it, from the recorder's own stack where it kept one (torch symbolises those
    only once torch._inductor is loaded, see agent/recorder.py), else from the stack of a
    waiting rank: gloo blocks where it was issued, unless the rank waits on an async work
    (`work.wait()`), which is then said as such; NCCL's rank has moved on."""
    waiting = [r for r in row.issued if r not in row.completed and r in ranks]
    return _where(row.entry, ranks[waiting[0]] if waiting else None)


def _where(entry: Entry | None, p: ProcessSnapshot | None, *, branch: bool = False) -> str:
    """Where one rank issued its entry: _issued_from for one rank's entry and stack; with
    `branch`, the rank-dependent if its call sits under."""
    thread = p.main_thread if p is not None else None
    here = innermost_user_frame(thread) if thread is not None else None
    frames, recorded = _issuing_frames(entry, p)
    site = innermost_user_frame(ThreadStack(0, None, frames)) if frames else None
    backward = any(f.function.endswith("backward") and not is_user_frame(f) for f in frames)
    purpose = _BACKWARD_PURPOSE.get(entry.op) if backward and entry else None
    if not recorded and site is not None and ".wait(" in source_line(site):
        return f" ({_site(site, 'waited for at')})"  # async_op=True: issued elsewhere
    parts = [x for x in (purpose, _site(site, "from")) if x]
    if here is not None and site is not None and (here.file, here.line) != (site.file, site.line):
        parts.append(_site(here, "waiting at"))  # async_op=True, then wait() elsewhere
    taken = rank_branch(site) if branch else None
    if taken:
        parts.append(f"under {taken}")
    return f" ({'; '.join(parts)})" if parts else ""


def _site(frame: Frame | None, how: str) -> str:
    """'from `loss.backward()` at train.py:36', 'waited for at `work.wait()` at ...'."""
    if frame is None:
        return ""
    line = f":{frame.line}" if frame.line else ""
    text = source_line(frame)
    return (f"{how} `{text}` at " if text else f"{how} {frame.function} at ") + \
        f"{short_path(frame.file)}{line}"


def _instead(view: GroupView, absent: list[int], ranks: dict[int, ProcessSnapshot]) -> str:
    """' (its last was #8): it is in read_checkpoint at train.py:30 (blocked, ...)' for one
    rank; ': rank 1 (last #8) is in ...; rank 3 (last #8) is in ...' for several."""
    def last(rank: int) -> str:
        seq = view.last_issued.get(rank, -1)
        return f"#{seq}" if seq > 0 else "none"

    if len(absent) == 1:
        rank, = absent
        what, seq = _doing(rank, ranks), last(rank)
        before = f"its last was {seq}" if seq != "none" else "it issued none in this group"
        return (f" ({before}): it is {what}" if what else
                f" ({before}); no stack of it was captured")
    return ": " + "; ".join(f"rank {r} (last {last(r)}) is {_doing(r, ranks)}"
                            if _doing(r, ranks) else f"rank {r} (last {last(r)}): no stack"
                            for r in absent)


def _doing(rank: int, ranks: dict[int, ProcessSnapshot]) -> str | None:
    """'in read_checkpoint at train.py:30 (blocked, 0% CPU, openat of ...)'."""
    p = ranks.get(rank)
    return f"in {main_location(p)} ({describe_state(p)})" if p is not None else None


def _no_dump(view: GroupView, ranks: dict[int, ProcessSnapshot]) -> str:
    if not view.missing:
        return ""
    return "; no recorder dump from " + "; ".join(
        f"rank {r} ({missing_reason(ranks.get(r))})" for r in view.missing)


def missing_reason(p: ProcessSnapshot | None) -> str:
    """Why a rank sent no dump, in the words a report gives."""
    if p is None:
        return "not seen at capture: dead, or on a node whose agent did not answer"
    if p.recording is not None:
        return p.recording.error or "its dump could not be read"
    if p.state == ProcessState.EXITED:
        return "it exited"
    if p.stacks_from == "faulthandler":
        return "its agent did not answer: its main thread holds the GIL"
    if p.no_agent:
        return f"it had no hangkit agent: {p.no_agent}"
    return "no hangkit agent reported from it"
