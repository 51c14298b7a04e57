"""Turning torch's Flight Recorder on for a job, and where torch writes its own dumps.

The recorder keeps the last TORCH_FR_BUFFER_SIZE collectives of a process
(TORCH_NCCL_TRACE_BUFFER_SIZE before torch 2.7). torch 2.13 keeps 2,000 by default; older
versions keep none unless told. hangkit sets it for the jobs it runs (`hangkit watch`, notebook
engines), to torch 2.13's default, or to 0 with --no-flight-recorder, unless the user set either
variable: theirs stands.

What it costs, measured in benchmarks/bench_flight_recorder.py: about 10 us per collective to
record it, which a DDP step with a few gradient buckets does not notice, and the memory of
BUFFER_ENTRIES entries.
"""

from __future__ import annotations

import os
import secrets

BUFFER_VARIABLES = ("TORCH_FR_BUFFER_SIZE", "TORCH_NCCL_TRACE_BUFFER_SIZE")
# NCCL's watchdog dumps its recorder when a byte is written to this + rank + ".pipe".
NCCL_PIPE_VARIABLE = "TORCH_NCCL_DEBUG_INFO_PIPE_FILE"
BUFFER_ENTRIES = 2000  # torch 2.13's own default
# Where torch writes a dump by itself (TORCH_NCCL_DUMP_ON_TIMEOUT): prefix + rank.
DUMP_PREFIX_VARIABLES = ("TORCH_FR_DUMP_TEMP_FILE", "TORCH_NCCL_DEBUG_INFO_TEMP_FILE")
# Unset, torch 2.7 and later write to its cache directory (DebugInfoWriter::getWriter in
# FlightRecorder.cpp: $XDG_CACHE_HOME/torch/, else $HOME/.cache/torch/, else /tmp/.cache/torch/)
# and torch before 2.7 to /tmp: both are looked in, the newer default first.
DUMP_FILE_NAME = "comm_lib_trace_rank_"
LEGACY_DUMP_PREFIX = "/tmp/nccl_trace_rank_"
# The directory a Polaris job script (hangkit polaris job) has them written to, in the job's
# working directory: a node's /tmp is gone with the job.
JOB_DUMP_DIRECTORY = "hangkit-flight-recorder-"  # + the PBS job id


def recorder_environment(env: dict[str, str], *, on: bool = True
                         ) -> tuple[dict[str, str], list[str]]:
    """(env with the recorder on, or off, one line per change to say): no change where the
    user set it. Turning it off is what the user asked for, so it is not said. On, NCCL's
    watchdog also gets a pipe to be asked through (monitor/nccl_pipe.py)."""
    env, changes = dict(env), []
    if not any(name in env for name in BUFFER_VARIABLES):
        env["TORCH_FR_BUFFER_SIZE"] = str(BUFFER_ENTRIES) if on else "0"
        if on:
            changes.append(f"TORCH_FR_BUFFER_SIZE={BUFFER_ENTRIES} (torch's Flight Recorder "
                           f"keeps the last {BUFFER_ENTRIES} collectives for the report; "
                           "--no-flight-recorder turns it off)")
    if on and NCCL_PIPE_VARIABLE not in env:
        # /tmp is on every node (torch's watchdog fails on a directory that is not); the
        # random part keeps jobs apart and the name unguessable.
        env[NCCL_PIPE_VARIABLE] = f"/tmp/hk-{secrets.token_hex(4)}-nccl-rank"
    return env, changes


def dump_prefixes(env: dict[str, str]) -> list[str]:
    """The prefixes torch's own dumps are written under, for a process with this environment:
    the one it was given, else torch 2.7+'s default and the older one."""
    given = next((env[n] for n in DUMP_PREFIX_VARIABLES if env.get(n)), None)
    if given:
        return [given]
    cache = env.get("XDG_CACHE_HOME") or os.path.join(env.get("HOME") or "/tmp", ".cache")
    return [os.path.join(cache, "torch", DUMP_FILE_NAME), LEGACY_DUMP_PREFIX]
