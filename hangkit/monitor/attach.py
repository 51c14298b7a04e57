"""`hangkit attach`: look at a running job that hangkit did not start, or snapshot one it did.

The job is found from any of its processes (monitor/foundjob.py), or by its PBS job id on each
of its nodes. Then the same path as watch's: a look at every process (monitor/confirm.py: its
samples and classes), the capture it ends with, the diagnosis, one HangReport. With a
`timeout`, it looks again until then, and judges the last look against all it saw. The job is
left running unless `end` is asked and the verdict is a hang: a person attaching to a job
that is progressing has not asked for it to be killed.

A job under `hangkit watch` is asked through its watch (SIGUSR1): watch's monitor hears its
ranks' agents and its nodes' relays, and writes the snapshot beside its reports.

Across nodes (`attach_nodes`), each node runs `hangkit attach --job ID --node-json` itself,
reached as users reach their job's nodes (ssh, or $HANGKIT_SSH), all at once under one
deadline; a node's answer is its snapshots and its look, merged here as the relays' are.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from hangkit.errors import HangkitError, UsageError, check_seconds_or_zero
from hangkit.files import default_report_dir
from hangkit.monitor.foundjob import (
    SNAPSHOT_PREFIX,
    SSH_VARIABLE,
    FoundJob,
    NoSuchJob,
    Watched,
    find_job,
    find_pbs_job,
    watch_of,
)
from hangkit.procfs import read_environ
from hangkit.records import Activity, HangReport, Look, NodeReport, ProcessLook, ProcessSnapshot
from hangkit.redact import secret_values
from hangkit.text import first_line

HUNG, PROGRESSING, SNAPSHOT, UNKNOWN = "hung", "progressing", "snapshot", "unknown"
HANG_EXIT = 124
# One look samples each process SAMPLES times GAP apart: a window of about 2 s, so that a
# training step of up to that long, spent in one C++ call (backward), shows a second stack
# (--timeout looks again, for longer steps).
SAMPLES, GAP = 6, 0.3
RELOOK_SECONDS = 2.0  # between looks, while `timeout` allows
SNAPSHOT_SECONDS = 60.0  # for watch to write a snapshot asked for (a look and a capture)
NODE_SECONDS = 60.0  # for a node to answer, on top of `timeout`: ssh, start-up, its look
NODE_ANSWER_BYTES = 256 << 20  # what one node's answer may weigh: snapshots of its processes


@dataclass
class AttachResult:
    # HUNG, PROGRESSING, SNAPSHOT (of a watched job: watch judges hangs), or UNKNOWN (no
    # rank's or worker's stacks could be read: another user's job, ptrace not allowed)
    verdict: str
    exit_code: int  # HANG_EXIT when hung, 1 when unknown, 0 otherwise
    report: HangReport | None
    paths: tuple[Path, Path] | None  # hang-report.json and .md
    summary: list[str] = field(default_factory=list)  # what the CLI prints
    message: str = ""  # one line: the verdict and why


@dataclass
class NodeLook:
    """What one node saw of its part of the job (`--node-json`)."""

    host: str
    snapshots: list[ProcessSnapshot]
    look: Look | None
    seconds: float
    found: bool

    def to_json(self) -> dict:
        return {"host": self.host, "found": self.found, "seconds": round(self.seconds, 2),
                "snapshots": [s.to_json() for s in self.snapshots],
                "look": self.look.to_json() if self.look else None}

    @classmethod
    def from_json(cls, d: dict) -> NodeLook:
        return cls(host=str(d["host"]), found=bool(d["found"]), seconds=float(d["seconds"]),
                   snapshots=[ProcessSnapshot.from_json(s) for s in d["snapshots"]],
                   look=Look.from_json(d["look"]) if d.get("look") else None)


def attach(target: int | str, *, hosts: list[str] | None = None, timeout: float = 0.0,
           end: bool = False, report_dir: str | os.PathLike | None = None,
           grace: float = 30.0) -> AttachResult:
    """Looks at the job `target` belongs to (a pid on this node), or at PBS job `target` (a
    str) on `hosts` (default: its nodes as PBS knows them, else this node): the verdict, the
    report written, and the summary. Raises NoSuchJob (no such job) or UsageError."""
    check_seconds_or_zero("timeout", timeout)
    check_seconds_or_zero("grace", grace)
    if isinstance(target, bool) or not isinstance(target, int | str):
        raise UsageError(f"attach to a pid (int) or a PBS job id (str), not {target!r}")
    if isinstance(target, int):
        if target <= 0:
            raise UsageError(f"not a process id: {target}")
        watched = watch_of(target)
        if watched is not None:
            return snapshot_of_watch(watched)
        job = find_job(target)
        found = look_here(job, timeout=timeout)
        return _conclude([found], job=job, what=f"pid {target}", end=end,
                         report_dir=report_dir, grace=grace)
    job_id = target.strip()
    if not job_id or any(c.isspace() for c in job_id) or job_id.startswith("-"):
        raise UsageError(f"not a PBS job id: {target!r}")
    here = find_pbs_job(job_id)
    watched = next((w for pid in (here.pids() if here else []) if (w := watch_of(pid))), None)
    if watched is not None:  # its watch hears every node's relay: it answers for all of them
        return snapshot_of_watch(watched)
    hosts = list(hosts) if hosts is not None else job_hosts(job_id)
    if not hosts or hosts == [socket.gethostname()]:
        job = here
        if job is None:
            raise NoSuchJob(f"no process of PBS job {job_id} on this node",
                            hint="give the job's nodes with --hosts FILE, or run this on one")
        return _conclude([look_here(job, timeout=timeout)], job=job, what=f"PBS job {job_id}",
                         end=end, report_dir=report_dir, grace=grace)
    if end:
        raise UsageError("--end ends a job on this node only: attach to it on its head node")
    looks, notes = look_at_nodes(job_id, hosts, timeout=timeout)
    if not any(n.found for n in looks):
        raise NoSuchJob(f"no process of PBS job {job_id} on {', '.join(hosts)}"
                        + (f" ({'; '.join(notes.values())})" if notes else ""))
    return _conclude(looks, job=None, what=f"PBS job {job_id}", end=False,
                     report_dir=report_dir, grace=grace, unanswered=notes)


def look_here(job: FoundJob, *, timeout: float) -> NodeLook:
    """Looks at the job's processes on this node, and again until `timeout`: the last look,
    judged against every stack the looks saw (confirm.py's history), and its capture. So a
    rank still on its way into its wait is seen arrived, and a training step longer than one
    look is seen to have moved on."""
    from hangkit.monitor.confirm import Confirmation
    from hangkit.monitor.server import Monitor

    started = time.monotonic()
    confirmation = Confirmation()
    # The look's machinery asks a monitor for agents and relays: this one hears none, so
    # every process is sampled and captured from outside (py-spy, /proc).
    with Monitor() as monitor:
        while True:
            look = confirmation.look(monitor, [], job.pids(), at=time.monotonic() - started,
                                     samples=SAMPLES, gap=GAP)
            left = timeout - (time.monotonic() - started)
            if confirmation.all_gone or left <= 0:
                break
            time.sleep(min(RELOOK_SECONDS, left))  # the next look, bounded by `timeout`
    for s in confirmation.snapshots:
        s.host = s.host or socket.gethostname()
    return NodeLook(host=socket.gethostname(), snapshots=confirmation.snapshots,
                    look=look, seconds=time.monotonic() - started, found=True)


def moving(look: Look) -> list[ProcessLook]:
    """The ranks and workers that moved during the look. Unlike watch, which looks only after
    a silence, attach knows nothing of the job's output: a rank that returns to stacks it
    showed before (a training loop that neither prints nor beats) is moving too."""
    return [p for p in look.processes if p.deciding
            and p.activity in (Activity.PROGRESSING, Activity.LOOPING)]


def node_json(job_id: str, *, timeout: float) -> dict:
    """A node's answer to `attach --job` (`--node-json`): its part of the job, looked at."""
    job = find_pbs_job(job_id)
    if job is None:
        return NodeLook(socket.gethostname(), [], None, 0.0, found=False).to_json()
    return look_here(job, timeout=timeout).to_json()


def look_at_nodes(job_id: str, hosts: list[str], *, timeout: float
                  ) -> tuple[list[NodeLook], dict[str, str]]:
    """Every node's look, all at once: (those that answered, {host: why not} for the rest)."""
    ssh = os.environ.get(SSH_VARIABLE) or "ssh"
    limit = timeout + NODE_SECONDS

    def ask(host: str) -> NodeLook | str:
        if host == socket.gethostname():  # this node: no ssh to itself
            try:
                return NodeLook.from_json(node_json(job_id, timeout=timeout))
            except HangkitError as e:
                return e.one_line()
        argv = [ssh, host, sys.executable, "-m", "hangkit", "attach", "--job", job_id,
                "--timeout", f"{timeout:g}", "--node-json"]
        try:
            done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True,
                                  timeout=limit)
        except subprocess.TimeoutExpired:
            return f"did not answer within {limit:g} s"
        except OSError as e:
            return f"cannot run {ssh}: {e.strerror}"
        if done.returncode != 0:
            why = first_line(done.stderr.decode(errors="replace").strip()[-500:], "no message")
            return f"{ssh} exited {done.returncode}: {why}"
        if len(done.stdout) > NODE_ANSWER_BYTES:
            return f"its answer was over {NODE_ANSWER_BYTES >> 20} MiB"
        try:
            return NodeLook.from_json(json.loads(done.stdout))
        except (ValueError, KeyError, TypeError) as e:
            return f"its answer could not be read ({type(e).__name__})"

    with ThreadPoolExecutor(max_workers=min(len(hosts), 64)) as pool:
        answers = dict(zip(hosts, pool.map(ask, hosts), strict=True))
    looks = [a for a in answers.values() if isinstance(a, NodeLook)]
    notes = {h: a for h, a in answers.items() if isinstance(a, str)}
    return looks, notes


def job_hosts(job_id: str) -> list[str]:
    """The nodes of PBS job `job_id`: its node file when this shell is inside the job, else
    `qstat -f`'s exec_host; [] when neither says."""
    from hangkit.launcher import job_nodes

    if os.environ.get("PBS_JOBID", "").split(".")[0] == job_id.split(".")[0]:
        nodes = job_nodes()
        if nodes:
            return nodes
    try:
        done = subprocess.run(["qstat", "-f", job_id], capture_output=True, timeout=20,
                              stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return []
    text = done.stdout.decode(errors="replace").replace("\n\t", "")
    for line in text.splitlines():
        name, _, value = line.strip().partition(" = ")
        if name == "exec_host":  # host/0*64+host2/0*64
            return list(dict.fromkeys(part.split("/")[0] for part in value.split("+")
                                      if part.strip()))
    return []


def snapshot_of_watch(watched: Watched, *, timeout: float = SNAPSHOT_SECONDS) -> AttachResult:
    """Asks `hangkit watch` for a snapshot of its job (SIGUSR1) and reads the report it
    writes; the job goes on."""
    from hangkit.monitor.report import read_report, render_summary

    if not watched.reports:
        raise HangkitError(f"pid {watched.pid} is a hangkit watch that takes no snapshots",
                           hint="send it SIGUSR1 only if it is hangkit 0.x or later")
    base = Path(watched.reports)
    before = set(_snapshots(base))
    os.kill(watched.pid, signal.SIGUSR1)
    ends = time.monotonic() + timeout
    while time.monotonic() < ends:
        new = [p for p in _snapshots(base) if p not in before
               and (p / "hang-report.json").is_file()]
        if new:
            found, report = read_report(new[-1])
            message = f"hangkit watch (pid {watched.pid}) wrote a snapshot: {new[-1]}"
            return AttachResult(SNAPSHOT, 0, report,
                                (found, found.with_name("hang-report.md")),
                                render_summary(report), message)
        if not psutil.pid_exists(watched.pid):
            raise NoSuchJob(f"hangkit watch (pid {watched.pid}) ended before its snapshot")
        time.sleep(0.1)  # the snapshot takes a look and a capture: seconds
    raise HangkitError(f"hangkit watch (pid {watched.pid}) wrote no snapshot under {base} "
                       f"within {timeout:g} s")


def _snapshots(base: Path) -> list[Path]:
    with contextlib.suppress(OSError):
        return sorted((p for p in base.iterdir() if p.name.startswith(SNAPSHOT_PREFIX)),
                      key=lambda p: int(p.name[len(SNAPSHOT_PREFIX):] or 0)
                      if p.name[len(SNAPSHOT_PREFIX):].isdigit() else -1)
    return []


def _conclude(looks: list[NodeLook], *, job: FoundJob | None, what: str, end: bool,
              report_dir, grace: float, unanswered: dict[str, str] | None = None
              ) -> AttachResult:
    """The verdict on the nodes' looks, the report, and the job ended if asked and hung."""
    from hangkit.monitor.confirm import progressing_phrase
    from hangkit.monitor.jobcontext import job_context
    from hangkit.monitor.report import (
        build_report,
        render_summary,
        write_report,
    )

    merged = _merge_looks([n.look for n in looks if n.look is not None])
    snapshots = [s for n in looks for s in n.snapshots]
    deciding = [p for p in merged.processes if p.deciding]
    if not snapshots or (deciding and all(p.activity == Activity.GONE for p in deciding)):
        raise NoSuchJob(f"{what}: the job ended while hangkit looked at it")
    moved = moving(merged)
    verdict = PROGRESSING if moved else HUNG if deciding else UNKNOWN
    merged.verdict = verdict
    root = job.root_pid if job is not None else None
    command, started_at = _command_of(root)
    env = (read_environ(root) if root is not None else None) or {}
    if verdict == HUNG:
        reason = f"attached to {what}: no rank or worker progressing"
    elif verdict == UNKNOWN:
        why = next((s.stack_error for s in snapshots if s.stack_error and s.cmdline
                    and "ptrace" in s.stack_error), None) or next(
            (s.stack_error or s.note for s in snapshots if s.stack_error or s.note), "")
        reason = (f"attached to {what}: no rank's or worker's stacks could be read, so no "
                  f"verdict ({first_line(why, 'no stacks')})")
    else:
        reason = f"attached to {what}: {progressing_phrase(moved)}"
    nodes = [NodeReport(host=n.host, answered=True, seconds=round(n.seconds, 1),
                        processes=len(n.snapshots),
                        note=None if n.found else "no process of the job there")
             for n in looks] if job is None else []
    nodes += [NodeReport(host=h, answered=False, note=why)
              for h, why in (unanswered or {}).items()]
    # The job's secret values (its environment's, not only ours) are hidden wherever they show.
    secrets = sorted({*secret_values(os.environ), *secret_values(env)}, key=len, reverse=True)
    report = build_report(
        reason=reason, command=command, idle_seconds=0.0, processes=snapshots,
        last_lines=[], context={**job_context(env), "attached": what}, detector="attach",
        started_at=started_at, capture_seconds=merged.capture_seconds, looks=[merged],
        nodes=nodes, secrets=secrets)
    report.hang = verdict == HUNG
    directory = Path(report_dir) if report_dir else default_report_dir()
    paths = write_report(report, directory)
    summary = render_summary(report)
    if end and job is not None:
        summary += _end(job, grace) if verdict == HUNG else [
            "hangkit: --end: the job is progressing; left running"]
    code = {HUNG: HANG_EXIT, UNKNOWN: 1}.get(verdict, 0)
    return AttachResult(verdict, code, report, paths, summary, reason)


def _merge_looks(looks: list[Look]) -> Look:
    """One look of the whole job from each node's own (they ran at the same time)."""
    if len(looks) == 1:
        return looks[0]
    processes: list[ProcessLook] = [p for look in looks for p in look.processes]
    return Look(at=0.0, seconds=max((x.seconds for x in looks), default=0.0),
                samples=max((x.samples for x in looks), default=0), processes=processes,
                capture_seconds=max((x.capture_seconds for x in looks), default=0.0),
                cpu_seconds=sum(x.cpu_seconds for x in looks))


def _command_of(pid: int | None) -> tuple[list[str], float | None]:
    with contextlib.suppress(psutil.Error, TypeError, ValueError):
        proc = psutil.Process(pid)
        return proc.cmdline(), proc.create_time()
    return [], None


def _end(job: FoundJob, grace: float) -> list[str]:
    """Ends the job as watch does: every process, SIGTERM then SIGKILL, its shared memory."""
    from hangkit.monitor.terminate import end_job

    result = end_job(job, grace=grace)
    lines = [f"hangkit: --end: ended {len(result.terminated)} process(es) with SIGTERM"
             + (f", {len(result.killed)} with SIGKILL" if result.killed else "")]
    if result.removed:
        lines.append("hangkit: removed the shared memory they left: "
                     + ", ".join(result.removed))
    if result.survivors:
        lines.append(f"hangkit: WARNING: could not end: {', '.join(map(str, result.survivors))}")
    return lines
