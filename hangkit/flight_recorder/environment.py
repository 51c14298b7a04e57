"""Turning torch's Flight Recorder on for a job, and where torch writes its own dumps.

The recorder is on for a process group when TORCH_FR_BUFFER_SIZE (TORCH_NCCL_TRACE_BUFFER_SIZE
before torch 2.7) is set when the group is created. hangkit sets it for the jobs it runs
(`hangkit watch`, notebook engines) unless the user set either variable: theirs stands.

What it costs, measured in benchmarks/bench_flight_recorder.py: about 10 us per collective to
record it (a 4-rank DDP step with a few buckets does not notice) and BUFFER_ENTRIES entries of
memory. torch keeps only the last BUFFER_ENTRIES collectives of each process: enough for the
collectives around a hang, which is all a diagnosis reads.
"""

from __future__ import annotations

BUFFER_VARIABLES = ("TORCH_FR_BUFFER_SIZE", "TORCH_NCCL_TRACE_BUFFER_SIZE")
BUFFER_ENTRIES = 256
# Where torch writes a dump by itself (TORCH_NCCL_DUMP_ON_TIMEOUT): prefix + rank.
DUMP_PREFIX_VARIABLES = ("TORCH_FR_DUMP_TEMP_FILE", "TORCH_NCCL_DEBUG_INFO_TEMP_FILE")
DEFAULT_DUMP_PREFIX = "/tmp/nccl_trace_rank_"


def recorder_environment(env: dict[str, str]) -> tuple[dict[str, str], list[str]]:
    """(env with the recorder on, one line per change): no change where the user set it."""
    if any(name in env for name in BUFFER_VARIABLES):
        return dict(env), []
    return {**env, "TORCH_FR_BUFFER_SIZE": str(BUFFER_ENTRIES)}, [
        f"TORCH_FR_BUFFER_SIZE={BUFFER_ENTRIES} (torch's Flight Recorder keeps the last "
        f"{BUFFER_ENTRIES} collectives for the report; --no-flight-recorder turns it off)"]


def dump_prefix(env: dict[str, str]) -> str:
    """The prefix torch's own dumps are written under."""
    return next((env[n] for n in DUMP_PREFIX_VARIABLES if env.get(n)), DEFAULT_DUMP_PREFIX)
