"""torch's Flight Recorder, read from inside a rank: the agent's side.

torch records every collective of every process group when TORCH_FR_BUFFER_SIZE is set: gloo's
in one recorder, NCCL's (CUDA builds) in another. The agent reads them
- at capture, as a whole (recording()): sent with the rank's stacks;
- with each beat, only the groups' counters (live_collective()): microseconds.

Nothing here imports torch. A rank that never initialised torch.distributed has no recorder,
and neither has an older torch: both read as None, and everything else works as before.
"""

from __future__ import annotations

import json
import pickle
import sys
import time

from hangkit.flight_recorder.dumps import plain
from hangkit.records import CollectiveState

# NCCL's recorder exists in CUDA builds only; gloo's (and, from torch 2.9, any backend's) in all.
DUMPERS = ("_dump_nccl_trace", "_dump_fr_trace")
STATUS_DUMPERS = ("_dump_nccl_trace_json", "_dump_fr_trace_json")
DEFAULT_GROUP = "0"  # torch names the default process group "0"
# Entries sent per group: the collectives around a hang are the last ones, and a report of
# thousands of ranks must stay readable (torch keeps 2,000 per process).
KEEP_ENTRIES = 256


def _c10d():
    """torch's c10d extension, when this process has an initialised process group."""
    dist = sys.modules.get("torch.distributed")
    try:
        if dist is None or not dist.is_available() or not dist.is_initialized():
            return None
    except Exception:  # a half-imported torch
        return None
    return sys.modules.get("torch._C._distributed_c10d")


def recording() -> dict | None:
    """This rank's recorders, merged into one dump in torch's format, with `pg_config` filled
    in from the process groups Python knows (gloo's recorder leaves it empty, and torch's
    analyzer needs it). None without a process group or a recorder."""
    c10d = _c10d()
    if c10d is None:
        return None
    dumps = []
    for name in DUMPERS:
        dump = getattr(c10d, name, None)
        if dump is None:
            continue
        # Stack traces cost a one-time import of torch._inductor (over a second) the first time
        # they are symbolised: taken only when that is already paid. The call site then comes
        # from the rank's own stack.
        stacks = "torch._inductor" in sys.modules
        dumps.append(pickle.loads(dump(includeStackTraces=stacks)))  # our own process's bytes
    dumps = [d for d in dumps if d.get("entries") or d.get("pg_status")]
    if not dumps:
        return None
    return _merge(dumps)


def _merge(dumps: list[dict]) -> dict:
    merged = {"version": str(dumps[0].get("version", "")), "entries": [], "pg_status": {},
              "comm_lib_version": "", "pg_config": {}}
    seen = set()
    for d in dumps:
        for e in d.get("entries", []):
            key = (tuple(e.get("process_group", ())), e.get("collective_seq_id"),
                   e.get("p2p_seq_id"), e.get("op_id"), e.get("profiling_name"))
            if key not in seen:
                seen.add(key)
                merged["entries"].append(e)
        merged["pg_status"].update(d.get("pg_status", {}))
        merged["comm_lib_version"] = merged["comm_lib_version"] or d.get("comm_lib_version", "")
        merged["pg_config"].update({k: v for k, v in d.get("pg_config", {}).items() if k})
    merged = plain(merged)
    merged["pg_config"].update(process_groups(merged["entries"]))
    merged["entries"] = _newest(merged["entries"], KEEP_ENTRIES)
    return merged


def _newest(entries: list[dict], keep: int) -> list[dict]:
    """The last `keep` entries of each group, in the order they were recorded."""
    count: dict[str, int] = {}
    kept = []
    for e in reversed(entries):
        group = str((e.get("process_group") or [""])[0])
        count[group] = count.get(group, 0) + 1
        if count[group] <= keep:
            kept.append(e)
    return kept[::-1]


def process_groups(entries: list[dict]) -> dict[str, dict]:
    """{group name: {"name", "desc", "ranks"}} as torch's analyzer reads pg_config: from
    torch.distributed's own table of groups (names and ranks), descriptions from the entries."""
    descs = {str(e["process_group"][0]): str(e["process_group"][1])
             for e in entries if len(e.get("process_group", ())) == 2}
    out = {}
    try:
        from torch.distributed import distributed_c10d as c10d  # loaded: _c10d() said so

        names = dict(c10d._world.pg_names)  # a private table, but the only list of groups
        for group, name in names.items():
            ranks = sorted(c10d.get_process_group_ranks(group))
            desc = descs.get(name) or getattr(group, "group_desc", "") or name
            out[name] = {"name": name, "desc": desc, "ranks": str(ranks)}
    except Exception:  # another torch's layout: the entries' groups without their ranks
        for name, desc in descs.items():
            out.setdefault(name, {"name": name, "desc": desc, "ranks": "[]"})
    return out


class LiveCollective:
    """The collective a rank is in, from its recorder's counters, for ranks whose collectives
    hangkit.instrument() does not see (DDP's, FSDP's, issued from C++).

    Each beat reads the counters of every group (last enqueued, last completed): a group
    whose last enqueued collective has not completed is one the rank waits in. Its op is read
    from the full dump once it has been pending for a beat, and once per collective."""

    def __init__(self, clock=time.monotonic):
        self.clock = clock
        self._pending: dict[tuple[str, int], float] = {}  # (group, seq): first seen pending
        self._ops: dict[tuple[str, int], str] = {}

    def read(self) -> CollectiveState | None:
        c10d = _c10d()
        if c10d is None:
            return None
        status: dict = {}
        for name in STATUS_DUMPERS:
            dump = getattr(c10d, name, None)
            if dump is not None:
                status.update(json.loads(dump(includeCollectives=False)).get("pg_status", {}))
        if not status:
            return None
        now, latest = self.clock(), None
        pending = {}
        for group, s in status.items():
            issued, done = int(s.get("last_enqueued_collective", -1)), int(
                s.get("last_completed_collective", -1))
            if issued < 0:
                continue
            if issued > done:
                pending[(group, issued)] = self._pending.get((group, issued), now)
            elif latest is None or group == DEFAULT_GROUP:
                latest = (group, done)
        self._pending = pending
        if pending:
            (group, seq), since = min(pending.items(), key=lambda kv: kv[1])
            return CollectiveState("torch", _comm(group), self._op(c10d, group, seq, now - since),
                                   seq, inside=True, seconds=round(now - since, 3))
        if latest is None:
            return None
        group, seq = latest
        return CollectiveState("torch", _comm(group), self._ops.get(latest, ""), seq,
                               inside=False)

    def _op(self, c10d, group: str, seq: int, waited: float) -> str:
        key = (group, seq)
        if key not in self._ops and waited > 0:
            self._ops = {key: _op_of(c10d, group, seq)}  # only the latest is ever needed
        return self._ops.get(key, "")


def _op_of(c10d, group: str, seq: int) -> str:
    for name in DUMPERS:
        dump = getattr(c10d, name, None)
        if dump is None:
            continue
        for e in reversed(pickle.loads(dump(includeStackTraces=False)).get("entries", [])):
            if str(e.get("process_group", ("",))[0]) == group and (
                    e.get("collective_seq_id") == seq):
                return str(e.get("profiling_name", "")).split(":")[-1]
    return ""


def _comm(group: str) -> str:
    return "world" if group == DEFAULT_GROUP else f"group {group}"
