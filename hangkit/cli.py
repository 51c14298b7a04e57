"""The `hangkit` command. Exit codes: 0 ok, 1 failure (doctor: a probe failed or timed out;
attach: no such job), 2 bad usage, 124 a hang was caught (watch, attach), otherwise the
watched command's own exit code."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path

from hangkit import __version__
from hangkit.errors import (
    HangkitError,
    UsageError,
    check_at_least,
    check_positive_seconds,
    check_seconds_or_zero,
)
from hangkit.probes import PROBE_NAMES

DEFAULT_TIMEOUT = 600.0


class _Parser(argparse.ArgumentParser):
    """argparse, but bad usage raises UsageError so main() reports it in one line, exit 2."""

    def error(self, message):
        raise UsageError(message)


def _seconds_argument(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"not a finite number of seconds: {text!r}")
    return value


def _pid_argument(text: str) -> int:
    if not text.isdigit() or int(text) <= 0:
        raise argparse.ArgumentTypeError(f"not a process id: {text!r}")
    return int(text)


def _progress_timeout_argument(text: str) -> float | str:
    from hangkit.monitor.stall import AUTO

    return AUTO if text.strip().lower() == AUTO else _seconds_argument(text)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="hangkit", description="Catch, locate and explain hangs in "
                     "distributed PyTorch training.")
    parser.add_argument("--version", action="version", version=f"hangkit {__version__}")
    sub = parser.add_subparsers(dest="command_name", metavar="COMMAND", parser_class=_Parser)

    w = sub.add_parser("watch", help="run a command; on a hang, record where every process is "
                       "stuck, then end it", description="Run COMMAND, passing its output "
                       "through. When it prints nothing for --timeout seconds, or its ranks "
                       "report no progress for --progress-timeout seconds, look at every "
                       "process of the job: while a rank is still progressing (imports, "
                       "compilation), keep watching; else capture every process's stacks, "
                       "write hang-report.json and hang-report.md, print a summary, end the "
                       "job and exit 124.")
    w.add_argument("--timeout", type=_seconds_argument, default=None, metavar="S",
                   help="seconds without output that count as a hang (default: $HANG_TIMEOUT, "
                   f"else {DEFAULT_TIMEOUT:g})")
    w.add_argument("--progress-timeout", type=_progress_timeout_argument, default=None,
                   metavar="S|auto", help="seconds without hangkit.progress() from the ranks "
                   "that count as a hang, even while output continues; auto: 5 x the 95th "
                   "percentile of the ranks' recent step intervals, at least 30 s, once 5 "
                   "steps were seen (default: off; progress is still reported)")
    w.add_argument("--startup-timeout", type=_seconds_argument, default=1800.0, metavar="S",
                   help="seconds of silence that count as a hang before the job's first output "
                   "or its ranks' first progress beat: start-up on many nodes takes minutes "
                   "(default: 1800)")
    w.add_argument("--max-silence", type=_seconds_argument, default=None, metavar="S",
                   help="seconds of silence that end the job even while its ranks are seen "
                   "progressing (default: 10 x --timeout)")
    w.add_argument("--bind", default="127.0.0.1", metavar="ADDR",
                   help="interface the monitor listens on for the ranks' agents; use one the "
                   "compute nodes reach for multi-node jobs (default: 127.0.0.1)")
    w.add_argument("--grace", type=_seconds_argument, default=30.0, metavar="S",
                   help="seconds between SIGTERM and SIGKILL (default: 30)")
    w.add_argument("--report-dir", type=Path, default=None, metavar="DIR",
                   help="where reports go (default: a new directory under the current one)")
    w.add_argument("--setup-env", action=argparse.BooleanOptionalAction, default=True,
                   help="set PYTHONUNBUFFERED, OMP_NUM_THREADS, WANDB_SILENT and a short TMPDIR "
                   "for the command (default: on)")
    w.add_argument("--flight-recorder", action=argparse.BooleanOptionalAction, default=True,
                   help="turn torch's Flight Recorder on for the ranks (TORCH_FR_BUFFER_SIZE), "
                   "unless already set, so the report holds every rank's collectives "
                   "(default: on)")
    w.add_argument("--inject", action=argparse.BooleanOptionalAction, default=True,
                   help="start hangkit's agent in every rank of the command, with no change to "
                   "its code (a sitecustomize on a private PYTHONPATH entry), so plain scripts "
                   "report their stacks, collectives and Flight Recorder dumps (default: on)")
    w.add_argument("command", nargs=argparse.REMAINDER, metavar="-- COMMAND [ARGS...]")

    rk = sub.add_parser("rank", help="run one rank of a job as its shim: the parent that "
                        "binds its GPU, relays its node's beats and captures its processes",
                        description="Run COMMAND as one rank, with this process as its "
                        "parent: sets CUDA_VISIBLE_DEVICES from the local rank, and under "
                        "hangkit watch relays the node's progress beats (the node's first "
                        "shim starts the relay) and captures the rank and its DataLoader "
                        "workers when asked. Put it between mpiexec and the training command: "
                        "mpiexec ... hangkit rank -- python train.py. Exits with the rank's "
                        "exit code (128+N when signal N ended it).")
    rk.add_argument("--bind-gpu", action=argparse.BooleanOptionalAction, default=True,
                    help="set CUDA_VISIBLE_DEVICES to the local rank (or the local rank-th of "
                    "the devices it lists) before the rank starts (default: on)")
    rk.add_argument("command", nargs=argparse.REMAINDER, metavar="-- COMMAND [ARGS...]")

    at = sub.add_parser("attach", help="look at a running job hangkit did not start: where "
                        "every rank and worker is, and whether it is hung", description="Find "
                        "the job that PID belongs to (its launcher's tree, its ranks and their "
                        "DataLoader workers, and under PBS every process with its PBS_JOBID), "
                        "or PBS job ID on each of its nodes; look at every process as watch "
                        "does, capture, diagnose, and write the same hang report. The job "
                        "goes on (unless --end, and then only when it is hung). A job under "
                        "hangkit watch is asked through its watch, which writes a snapshot "
                        "beside its reports. Exit 124: hung; 0: a rank or worker is "
                        "progressing (it says which); 1: no such job; 2: bad usage.")
    at.add_argument("pid", nargs="?", type=_pid_argument, metavar="PID",
                    help="any process of the job on this node: its launcher or a rank")
    at.add_argument("--job", default=None, metavar="PBS_JOBID",
                    help="the PBS job to look at, on every one of its nodes (its node file "
                    "inside the job, else qstat -f), reached with ssh ($HANGKIT_SSH)")
    at.add_argument("--hosts", type=Path, default=None, metavar="FILE",
                    help="with --job: the nodes to look on, one per line (a PBS node file)")
    at.add_argument("--timeout", type=_seconds_argument, default=0.0, metavar="S",
                    help="look again and again for S seconds, and judge the last look against "
                    "every stack seen: a rank on its way into its wait is seen arrived, a step "
                    "longer than a look is seen to move on (default: 0, one look)")
    at.add_argument("--end", action="store_true",
                    help="end the job, as watch does, when it is judged hung")
    at.add_argument("--grace", type=_seconds_argument, default=30.0, metavar="S",
                    help="with --end: seconds between SIGTERM and SIGKILL (default: 30)")
    at.add_argument("--report-dir", type=Path, default=None, metavar="DIR",
                    help="where the report goes (default: a new directory under the current "
                    "one)")
    at.add_argument("--node-json", action="store_true", help=argparse.SUPPRESS)

    doc = sub.add_parser("doctor", help="run every hang probe, each in a child with a deadline",
                         description="Run the hang probes (each in its own process with a "
                         "deadline, independent ones at once), on this process's environment "
                         "or on N MPI ranks. Prints a table of probes by ranks and each "
                         "problem's advice. Exit 0: nothing failed or timed out; 1: something "
                         "did; 2: bad usage.")
    doc.add_argument("--ranks", type=int, default=None, metavar="N",
                     help="run the probes on N MPI ranks (local mpiexec; inside a PBS job, "
                     "across its nodes)")
    doc.add_argument("--timeout", type=_seconds_argument, default=30.0, metavar="S",
                     help="deadline per probe (default: 30)")
    doc.add_argument("--only", default=None, metavar="NAME,...",
                     help="run only these probes: " + ", ".join(PROBE_NAMES))
    doc.add_argument("--path", type=Path, default=Path("."), metavar="DIR",
                     help="directory the filesystem probe tests (default: the current one)")
    doc.add_argument("--json", type=Path, default=None, metavar="FILE",
                     help="also write the results as JSON")

    pol = sub.add_parser("polaris", help="ALCF Polaris helpers: PBS job scripts")
    pol_sub = pol.add_subparsers(dest="polaris_command", metavar="COMMAND", parser_class=_Parser)
    job = pol_sub.add_parser("job", help="write (and submit) a PBS job script that runs the "
                             "training under hangkit watch", description="Write the PBS job "
                             "script for a training command: PBS directives, modules, the "
                             "hang-safe environment, mpiexec with CPU binding, a per-rank GPU "
                             "wrapper, MASTER_ADDR, and the training under hangkit watch.")
    from hangkit.polaris.jobscript import add_arguments as add_job_arguments

    add_job_arguments(job)

    rep = sub.add_parser("report", help="gather a support bundle: doctor results, hang report, "
                         "output tail, job configuration, versions (secrets redacted)")
    from hangkit.bundle.command import add_arguments as add_report_arguments

    add_report_arguments(rep)

    ex = sub.add_parser("explain", help="the verdict on a hang from its report, or from the "
                        "Flight Recorder dumps torch wrote", description="Read a hang report "
                        "(its directory or hang-report.json) or a directory of torch's Flight "
                        "Recorder dumps (TORCH_FR_DUMP_TEMP_FILE + rank), merge the ranks' "
                        "collectives per process group, and say who waits where and who never "
                        "came. Exit 0 when read, 2 when PATH is neither.")
    ex.add_argument("path", type=Path, metavar="PATH")

    d = sub.add_parser("demo", help="the main job: a 4-rank training run where rank 2 wanders "
                       "off, caught by hangkit watch")
    d.add_argument("--ranks", type=int, default=4, help="MPI ranks to start (default: 4)")
    d.add_argument("--timeout", type=_seconds_argument, default=10.0, metavar="S",
                   help="watch's timeout for the demo (default: 10)")
    return parser


def _watch(args) -> int:
    from hangkit.monitor.stall import AUTO
    from hangkit.monitor.watch import WatchOptions, watch

    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    timeout = args.timeout
    if timeout is None:
        env_value = os.environ.get("HANG_TIMEOUT")
        try:
            timeout = float(env_value) if env_value else DEFAULT_TIMEOUT
        except ValueError:
            raise UsageError(f"HANG_TIMEOUT is not a number of seconds: {env_value!r}") from None
    check_positive_seconds("--timeout", timeout)
    check_seconds_or_zero("--grace", args.grace)
    if args.progress_timeout not in (None, AUTO):
        check_positive_seconds("--progress-timeout", args.progress_timeout)
    check_positive_seconds("--startup-timeout", args.startup_timeout)
    if args.max_silence is not None:
        check_positive_seconds("--max-silence", args.max_silence)
    return watch(WatchOptions(command=command, timeout=timeout, grace=args.grace,
                              report_dir=args.report_dir, setup_env=args.setup_env,
                              progress_timeout=args.progress_timeout, bind=args.bind,
                              startup_timeout=args.startup_timeout,
                              max_silence=args.max_silence,
                              flight_recorder=args.flight_recorder, inject=args.inject))


def _attach(args) -> int:
    import json

    from hangkit.monitor.attach import attach, node_json

    check_seconds_or_zero("--timeout", args.timeout)
    check_seconds_or_zero("--grace", args.grace)
    if (args.pid is None) == (args.job is None):
        raise UsageError("give a PID or --job PBS_JOBID (one of them)")
    if args.hosts is not None and args.job is None:
        raise UsageError("--hosts goes with --job")
    if args.node_json:  # one node's answer to an attach --job on several (attach_nodes)
        if args.job is None:
            raise UsageError("--node-json goes with --job")
        print(json.dumps(node_json(args.job, timeout=args.timeout)))
        return 0
    hosts = None
    if args.hosts is not None:
        from hangkit.launcher import nodefile_hosts

        try:
            hosts = list(dict.fromkeys(nodefile_hosts(args.hosts)))
        except OSError as e:
            raise UsageError(f"--hosts: cannot read {args.hosts}: {e.strerror}") from None
        if not hosts:
            raise UsageError(f"--hosts: no host in {args.hosts}")
    result = attach(args.pid if args.pid is not None else args.job, hosts=hosts,
                    timeout=args.timeout, end=args.end, report_dir=args.report_dir,
                    grace=args.grace)
    for line in result.summary:
        print(line, file=sys.stderr)
    if result.paths:
        print(f"hangkit: report: {result.paths[1]} (and {result.paths[0].name} beside it)",
              file=sys.stderr)
    print(f"hangkit: {result.message}", file=sys.stderr)
    return result.exit_code


def _doctor(args) -> int:
    import time

    from hangkit.probes import select
    from hangkit.probes.report import exit_code, render, write_json
    from hangkit.probes.runner import run_doctor

    select(args.only, name="--only")
    check_positive_seconds("--timeout", args.timeout)
    if args.ranks is not None:
        check_at_least("--ranks", args.ranks, 1)
    if not args.path.is_dir():
        raise UsageError(f"--path is not a directory: {args.path}")
    if args.json is not None and not args.json.parent.is_dir():
        raise UsageError(f"--json: no such directory: {args.json.parent}")
    started = time.monotonic()
    results = run_doctor(args.only, ranks=args.ranks, timeout=args.timeout, path=args.path)
    for line in render(results):
        print(line)
    if args.json is not None:
        write_json(results, args.json, ranks=args.ranks, timeout=args.timeout,
                   seconds=time.monotonic() - started)
    return exit_code(results)


def _demo(args) -> int:
    from hangkit.demo import WANDERING_RANK, run_demo

    check_at_least("--ranks", args.ranks, WANDERING_RANK + 1)
    check_positive_seconds("--timeout", args.timeout)
    return run_demo(ranks=args.ranks, timeout=args.timeout)


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        if args.command_name == "watch":
            return _watch(args)
        if args.command_name == "doctor":
            return _doctor(args)
        if args.command_name == "attach":
            return _attach(args)
        if args.command_name == "rank":
            from hangkit.shim.rank import run as run_rank

            return run_rank(args.command[1:] if args.command[:1] == ["--"] else args.command,
                            bind_gpu=args.bind_gpu)
        if args.command_name == "demo":
            return _demo(args)
        if args.command_name == "explain":
            from hangkit.flight_recorder.explain import explain

            print("\n".join(explain(args.path)))
            return 0
        if args.command_name == "polaris" and args.polaris_command == "job":
            from hangkit.polaris.jobscript import run as run_job

            return run_job(args)
        if args.command_name == "report":
            from hangkit.bundle.command import run as run_report

            return run_report(args)
        build_parser().print_help(sys.stderr)
        return 2
    except HangkitError as e:
        print(f"hangkit: error: {e.one_line()}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `hangkit doctor | head`: the reader left; say nothing more
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
