"""`hangkit polaris job`: the PBS job script users used to keep by hand (run_polaris.sh).

The script asks PBS for N Polaris nodes, loads ALCF's conda module, sets the hang-safe
environment, gives each rank the GPU of its local rank before Python starts (MP-06), and runs
the training command on nodes x ppn ranks under `hangkit watch`, so a hang ends in a report
instead of a silent job that runs to its walltime. `--doctor` runs `hangkit doctor` on the same
ranks first. `--submit` hands the written file to qsub, under a deadline.

render() is a pure function of JobOptions; run() validates, writes and submits. The script's
body runs outside PBS too (tests run it with MPICH's hydra): HANGKIT_MPIEXEC and
HANGKIT_MPIEXEC_FLAGS replace Polaris's mpiexec and its flags, and `module` is used only where
it exists.

Exit codes: 0 written (and submitted), 1 qsub failed or did not answer, 2 bad usage.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from hangkit import __version__
from hangkit.errors import HangkitError, UsageError
from hangkit.flight_recorder.environment import BUFFER_ENTRIES, JOB_DUMP_DIRECTORY
from hangkit.text import last_line

GPUS_PER_NODE = 4  # Polaris: 4 A100s a node, one rank each at most
HW_THREADS_PER_NODE = 64  # Polaris: one 32-core AMD EPYC Milan, 2 hardware threads a core
QSUB_TIMEOUT = 60.0  # seconds qsub gets to answer; a PBS server that is down never does
DEFAULT_MASTER_PORT = 29500  # torch.distributed's usual default; MASTER_PORT overrides it
# Short enough that multiprocessing's socket paths stay far below the AF_UNIX limit (DL-06).
TMPDIR_TEMPLATE = "/tmp/hk-XXXXXX"

_WALLTIME = re.compile(r"(\d+):(\d\d):(\d\d)")
# Values that go into #PBS directives and module lines: no spaces, quotes or newlines, which
# would end a directive early or start a shell command.
_ACCOUNT = re.compile(r"[A-Za-z0-9_.-]+")
_QUEUE = re.compile(r"[A-Za-z0-9_.@-]+")
_FILESYSTEM = re.compile(r"[A-Za-z0-9_]+")
_MODULE = re.compile(r"[A-Za-z0-9_.+/-]+")


@dataclass(frozen=True)
class JobOptions:
    """What the job script is made of; validated on construction (UsageError)."""

    account: str
    command: tuple[str, ...]
    nodes: int = 1
    walltime: str = "01:00:00"
    queue: str = "debug"
    filesystems: str = "home:eagle"
    ppn: int = GPUS_PER_NODE
    depth: int = 8
    hang_timeout: float = 600.0
    doctor: bool = False
    conda_module: str = "conda"
    inject: bool = True  # an agent in every rank with no code change (hangkit watch --inject)

    def __post_init__(self):
        if not self.command:
            raise UsageError("no command given: use hangkit polaris job [options] -- COMMAND "
                             "[ARGS...]")
        if self.nodes < 1:
            raise UsageError(f"--nodes {self.nodes}: a job needs at least 1 node")
        if not 1 <= self.ppn <= GPUS_PER_NODE:
            raise UsageError(f"--ppn {self.ppn}: ppn must be 1..{GPUS_PER_NODE} on Polaris "
                             f"({GPUS_PER_NODE} GPUs a node, one rank each)")
        if self.depth < 1:
            raise UsageError(f"--depth {self.depth}: each rank needs at least 1 core")
        if self.ppn * self.depth > HW_THREADS_PER_NODE:
            raise UsageError(f"--ppn {self.ppn} x --depth {self.depth} = "
                             f"{self.ppn * self.depth} hardware threads, more than the "
                             f"{HW_THREADS_PER_NODE} of a Polaris node")
        if not (math.isfinite(self.hang_timeout) and self.hang_timeout > 0):
            raise UsageError(f"--hang-timeout {self.hang_timeout:g}: must be a positive "
                             "number of seconds")
        object.__setattr__(self, "walltime", _walltime(self.walltime))
        object.__setattr__(self, "hang_timeout", float(self.hang_timeout))
        _check("--account", self.account, _ACCOUNT, "a project name (letters, digits, _ . -)")
        _check("--queue", self.queue, _QUEUE, "a queue name (letters, digits, _ . - @)")
        _check("--conda-module", self.conda_module, _MODULE,
               "a module name (letters, digits, _ . + / -)")
        parts = self.filesystems.split(":")
        if not all(_FILESYSTEM.fullmatch(p) for p in parts):
            raise UsageError(f"--filesystems {self.filesystems!r}: not a colon-separated list "
                             "of filesystem names, like home:eagle")


def _check(flag: str, value: str, pattern: re.Pattern, what: str) -> None:
    if not pattern.fullmatch(value):
        raise UsageError(f"{flag} {value!r}: not {what}")


def _walltime(text: str) -> str:
    match = _WALLTIME.fullmatch(text)
    if not match:
        raise UsageError(f"--walltime {text!r}: not HH:MM:SS")
    hours, minutes, seconds = (int(g) for g in match.groups())
    if minutes >= 60 or seconds >= 60:
        raise UsageError(f"--walltime {text!r}: minutes and seconds must be below 60")
    if hours == minutes == seconds == 0:
        raise UsageError(f"--walltime {text!r}: must be longer than zero")
    return f"{hours:02d}:{minutes:02d}:{seconds:02d}"


def _seconds_text(value: float) -> str:
    return str(int(value)) if value.is_integer() else repr(value)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `hangkit polaris job`, for a parser or a subcommand's parser."""
    parser.add_argument("--nodes", type=int, default=1, metavar="N",
                        help="Polaris nodes to ask for (default: 1)")
    parser.add_argument("--walltime", default="01:00:00", metavar="HH:MM:SS",
                        help="the job's walltime (default: 01:00:00)")
    parser.add_argument("--queue", default="debug", metavar="Q",
                        help="PBS queue (default: debug)")
    parser.add_argument("--account", required=True, metavar="A",
                        help="the ALCF project to charge (#PBS -A)")
    parser.add_argument("--filesystems", default="home:eagle", metavar="FS[:FS...]",
                        help="filesystems the job uses, colon-separated as PBS takes them "
                        "(default: home:eagle)")
    parser.add_argument("--ppn", type=int, default=GPUS_PER_NODE, metavar="N",
                        help=f"ranks per node, one GPU each: 1..{GPUS_PER_NODE} "
                        f"(default: {GPUS_PER_NODE})")
    parser.add_argument("--depth", type=int, default=8, metavar="D",
                        help="hardware threads each rank is bound to (mpiexec --depth "
                        "--cpu-bind depth) and its OMP_NUM_THREADS (default: 8)")
    parser.add_argument("--hang-timeout", type=float, default=600.0, metavar="S",
                        help="seconds without output from the ranks that hangkit watch takes "
                        "for a hang (HANG_TIMEOUT in the script; default: 600)")
    parser.add_argument("--doctor", action="store_true",
                        help="run `hangkit doctor --ranks NODES*PPN` first; a failed probe "
                        "ends the job before training starts")
    parser.add_argument("--conda-module", default="conda", metavar="MODULE",
                        help="the module that provides Python and torch (default: conda)")
    parser.add_argument("--out", type=Path, default=None, metavar="FILE",
                        help="write the script to FILE (mode 755) instead of printing it")
    parser.add_argument("--submit", action="store_true",
                        help="submit the written file with qsub and print the job id "
                        "(needs --out)")
    parser.add_argument("--inject", action=argparse.BooleanOptionalAction, default=True,
                        help="hangkit watch starts its agent in every rank with no change to "
                        "the training code; --no-inject leaves the ranks as they are "
                        "(default: on)")
    parser.add_argument("command", nargs=argparse.REMAINDER, metavar="-- COMMAND [ARGS...]",
                        help="the training command each rank runs")


def options_from_args(args: argparse.Namespace) -> JobOptions:
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    return JobOptions(account=args.account, command=tuple(command), nodes=args.nodes,
                      walltime=args.walltime, queue=args.queue, filesystems=args.filesystems,
                      ppn=args.ppn, depth=args.depth, hang_timeout=args.hang_timeout,
                      doctor=args.doctor, conda_module=args.conda_module,
                      inject=args.inject)


def render(options: JobOptions) -> str:
    """The job script for `options`: a pure function, the same text for the same options."""
    # The settings ALCF's notes report hanging NCCL; the doctor's environment probe flags them.
    from hangkit.probes.environment import NCCL_HANG_SETTINGS

    o = options
    mpiexec_flags = f"--ppn {o.ppn} --depth {o.depth} --cpu-bind depth"
    nccl = [f"#   {name}={value}" for name, value in NCCL_HANG_SETTINGS.items()]
    command = " ".join(shlex.quote(word) for word in o.command)
    doctor = [] if not o.doctor else [
        "",
        "# Pre-flight: every hang probe on the same ranks, each under a deadline. A failed probe",
        "# ends the job here rather than after the allocation was spent waiting on a hang.",
        'if ! hangkit doctor --ranks "${NRANKS}"; then',
        '    echo "hangkit: error: hangkit doctor found a problem (above); training not '
        'started" >&2',
        "    exit 1",
        "fi",
    ]
    lines = [
        "#!/bin/bash -l",
        f"#PBS -l select={o.nodes}:system=polaris",
        "#PBS -l place=scatter",
        f"#PBS -l walltime={o.walltime}",
        f"#PBS -l filesystems={o.filesystems}",
        f"#PBS -q {o.queue}",
        f"#PBS -A {o.account}",
        "#PBS -j oe",
        "#",
        f"# Written by `hangkit polaris job` (hangkit {__version__}); submit with qsub.",
        f"# Runs the training command on nodes x {o.ppn} ranks under `hangkit watch`: a hang",
        "# ends in a report (hangkit-report-*/hang-report.md in the submit directory), not in",
        "# a silent job that runs to its walltime. Hang ids (MP-06, DL-06, ...) refer to",
        "# hangkit's hang catalogue.",
        "# Read from the environment where set: MASTER_PORT, HANG_TIMEOUT, HANGKIT_MPIEXEC,",
        "# HANGKIT_MPIEXEC_FLAGS, HANGKIT_WATCH_BIND (to run this body elsewhere).",
        "",
        "# Stop at the first failure instead of launching ranks into a half-made environment.",
        "set -euo pipefail",
        "",
        "# PBS starts the job in $HOME; the command's relative paths mean the qsub directory.",
        ': "${PBS_O_WORKDIR:?is not set: submit this script with qsub}"',
        ': "${PBS_NODEFILE:?is not set: submit this script with qsub}"',
        'cd "${PBS_O_WORKDIR}"',
        "",
        "# Python and torch come from ALCF's conda module. Guarded so the body also runs where",
        "# there is no `module`; nounset is off around it because module's and conda's own",
        "# scripts read unset variables. If hangkit or your packages live in a virtual",
        "# environment, activate it after this block: source /path/to/venv/bin/activate",
        "if command -v module >/dev/null 2>&1; then",
        "    set +u",
        "    module use /soft/modulefiles",
        f"    module load {o.conda_module}",
        "    if command -v conda >/dev/null 2>&1; then conda activate base; fi",
        "    set -u",
        "fi",
        "# Say so now, once, rather than fail inside mpiexec on every rank.",
        "if ! command -v hangkit >/dev/null 2>&1; then",
        '    echo "hangkit: error: hangkit is not on PATH here; activate the environment that '
        'has it in this script" >&2',
        "    exit 1",
        "fi",
        "",
        "# The hang-safe environment (hangkit.envsetup; hangkit watch finds nothing to change).",
        "# Unbuffered output, so the log shows where a job stopped, not its last flush:",
        "export PYTHONUNBUFFERED=1",
        "# One OpenMP thread per hardware thread a rank is bound to (--depth), not one per core",
        "# of the node: oversubscription looks like a hang (IP-04), and thread pools alive when",
        "# DataLoader workers fork can deadlock them (DL-05).",
        f"export OMP_NUM_THREADS={o.depth}",
        "# wandb's own log lines stay out of every rank's output:",
        "export WANDB_SILENT=true",
        "# Compute nodes reach the internet only through ALCF's proxy; without it trackers",
        "# wait on the network (WJ-01). To log online, uncomment (or use WANDB_MODE=offline):",
        "# export https_proxy=http://proxy.alcf.anl.gov:3128 "
        "http_proxy=http://proxy.alcf.anl.gov:3128",
        "# NCCL: ALCF's Polaris notes on the AWS OFI NCCL plugin report these settings hanging",
        "# some applications; if collectives hang while they are set, unset them one at a time",
        "# (hangkit doctor's environment probe flags them):",
        *nccl,
        "# To see where NCCL stops in a hung collective: export NCCL_DEBUG=INFO",
        "",
        "# The job's nodes, one line each in PBS_NODEFILE; ranks = nodes x ranks per node.",
        'NNODES="$(wc -l < "${PBS_NODEFILE}")"',
        "if (( NNODES < 1 )); then",
        '    echo "hangkit: error: PBS_NODEFILE=${PBS_NODEFILE} lists no nodes" >&2',
        "    exit 1",
        "fi",
        f"NRANKS=$(( NNODES * {o.ppn} ))",
        "",
        "# A short TMPDIR: multiprocessing's socket paths under a long one pass the AF_UNIX",
        "# limit of 107 bytes and DataLoader workers hang (DL-06). Removed when the script",
        "# ends; on SIGTERM (walltime, qdel) bash runs the trap only after hangkit watch has",
        "# ended the ranks, so none loses its TMPDIR while running.",
        f'HANGKIT_JOB_TMPDIR="$(mktemp -d {TMPDIR_TEMPLATE})"',
        "trap 'rm -rf \"${HANGKIT_JOB_TMPDIR}\"' EXIT",
        "trap 'exit 143' TERM",
        'export TMPDIR="${HANGKIT_JOB_TMPDIR}"',
        "",
        "# torch's Flight Recorder keeps each rank's last collectives (what hangkit watch sets).",
        "# On a collective's timeout torch writes it to TORCH_FR_DUMP_TEMP_FILE + rank: here on",
        "# the shared filesystem, where it outlives the nodes' /tmp. `hangkit explain DIR` reads",
        "# the dumps; `hangkit report`, run in this directory, bundles them.",
        f'export TORCH_FR_BUFFER_SIZE="${{TORCH_FR_BUFFER_SIZE:-{BUFFER_ENTRIES}}}"',
        'export TORCH_FR_DUMP_TEMP_FILE="${TORCH_FR_DUMP_TEMP_FILE:-${PBS_O_WORKDIR}/'
        f'{JOB_DUMP_DIRECTORY}${{PBS_JOBID:-$$}}/nccl_trace_rank_}}"',
        'mkdir -p "$(dirname "${TORCH_FR_DUMP_TEMP_FILE}")"',
        "",
        "# torch.distributed's env:// rendezvous: rank 0 runs on the node file's first host,",
        "# and every rank must use the same free port (TD-05).",
        'MASTER_ADDR="$(head -n 1 "${PBS_NODEFILE}")"',
        "export MASTER_ADDR",
        f'export MASTER_PORT="${{MASTER_PORT:-{DEFAULT_MASTER_PORT}}}"',
        f'export HANG_TIMEOUT="${{HANG_TIMEOUT:-{_seconds_text(o.hang_timeout)}}}"',
        "",
        "# Each rank runs under `hangkit rank`, its parent on its node, which gives it the GPU",
        "# of its local rank before Python starts: set after mpi4py is imported it binds the",
        "# wrong device and NCCL hangs (MP-06). Local rank: PALS_LOCAL_RANKID under Polaris's",
        "# mpiexec, MPI_LOCALRANKID under MPICH's hydra. (ALCF's set_affinity_gpu_polaris.sh",
        "# maps local rank r to GPU 3-r for CPU-GPU affinity; this keeps r -> r.) It also makes",
        "# sure its node has the TMPDIR (this node's /tmp is not the others'), sends its node's",
        "# progress beats to hangkit watch in one batch a second, and on a hang captures the",
        "# rank and its DataLoader workers where they run, so every node is in the report.",
        *doctor,
        "",
        f"# Polaris's mpiexec (Cray PALS): {o.ppn} ranks a node, each bound to {o.depth} "
        "hardware",
        "# threads, so a rank's threads and DataLoader workers keep to their own cores (IP-04).",
        "# HANGKIT_MPIEXEC and HANGKIT_MPIEXEC_FLAGS replace them (MPICH's hydra takes neither",
        "# --depth nor --cpu-bind: set the flags to an empty string there).",
        'HANGKIT_MPIEXEC="${HANGKIT_MPIEXEC:-mpiexec}"',
        f'MPIEXEC_FLAGS="${{HANGKIT_MPIEXEC_FLAGS-{mpiexec_flags}}}"',
        'read -r -a MPIEXEC_ARGS <<< "${MPIEXEC_FLAGS}"',
        "",
        "# hangkit watch's monitor takes the ranks' progress beats: on this node alone for a",
        "# one-node job, on every interface when ranks run on other nodes too.",
        "if (( NNODES > 1 )); then",
        '    WATCH_BIND="${HANGKIT_WATCH_BIND:-0.0.0.0}"',
        "else",
        '    WATCH_BIND="${HANGKIT_WATCH_BIND:-127.0.0.1}"',
        "fi",
        "",
        "# When the ranks print nothing for HANG_TIMEOUT seconds, hangkit watch records where",
        "# every process is stuck (hang-report.md, .json), ends the job and exits 124. Otherwise",
        "# the job's exit code is the launcher's.",
        "# Every rank gets hangkit's agent with no change to its code (a sitecustomize on a",
        "# private PYTHONPATH entry); --no-inject on hangkit watch turns that off.",
        'hangkit watch --timeout "${HANG_TIMEOUT}" --bind "${WATCH_BIND}"'
        + ("" if o.inject else " --no-inject") + " -- \\",
        '    "${HANGKIT_MPIEXEC}" -n "${NRANKS}" ${MPIEXEC_ARGS[@]+"${MPIEXEC_ARGS[@]}"} \\',
        "    hangkit rank -- \\",
        f"    {command}",
    ]
    return "\n".join(lines) + "\n"


def write_script(path: Path, text: str) -> None:
    path.write_text(text)
    os.chmod(path, 0o755)


def submit(path: Path, *, qsub: str = "qsub", timeout: float = QSUB_TIMEOUT) -> str:
    """Runs `qsub path`; returns the job id it printed. HangkitError when it fails or does not
    answer within `timeout` seconds (it is killed then)."""
    try:
        done = subprocess.run([qsub, str(path)], capture_output=True, text=True,
                              stdin=subprocess.DEVNULL, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise HangkitError(f"qsub {path} did not answer within {timeout:g} s",
                           hint="is the PBS server up? try qstat, then qsub by hand") from None
    except OSError as e:
        raise HangkitError(f"cannot run {qsub}: {e.strerror or e}") from e
    if done.returncode != 0:
        last = last_line(done.stderr) or last_line(done.stdout) or "it printed nothing"
        raise HangkitError(f"qsub {path} failed (exit {done.returncode}): {last}")
    job_id = last_line(done.stdout)
    if not job_id:
        raise HangkitError(f"qsub {path} printed no job id")
    return job_id


def run(args: argparse.Namespace) -> int:
    """Validates, then prints the script or writes it (and submits it with --submit)."""
    options = options_from_args(args)
    out: Path | None = args.out
    qsub = None
    if args.submit:
        if out is None:
            raise UsageError("--submit needs --out FILE: qsub submits a file")
        qsub = shutil.which("qsub")
        if qsub is None:
            raise UsageError("qsub not found on PATH",
                             hint="submit from a Polaris login node, or drop --submit")
    if out is not None:
        if out.is_dir():
            raise UsageError(f"--out {out}: is a directory")
        if not out.parent.is_dir():
            raise UsageError(f"--out {out}: no such directory: {out.parent}")
    script = render(options)
    if out is None:
        sys.stdout.write(script)
        return 0
    write_script(out, script)
    if qsub is None:
        print(f"hangkit: wrote {out}; submit it with: qsub {shlex.quote(str(out))}",
              file=sys.stderr)
        return 0
    print(submit(out, qsub=qsub, timeout=QSUB_TIMEOUT))
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m hangkit.polaris.jobscript`: the same as the hangkit subcommand."""
    from hangkit.cli import main as hangkit_main

    return hangkit_main(["polaris", "job", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
