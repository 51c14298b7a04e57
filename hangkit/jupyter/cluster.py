"""An ipyparallel cluster of MPI engines, watched by a monitor in this kernel.

    cluster = EngineCluster(4).start()        # engine id == MPI rank; fails within a deadline
    cluster.setup(build_runner, config)        # a StepRunner on every engine
    task = cluster.steps(10)                   # returns at once; the dashboard follows it
    cluster.interrupt()                        # SIGINT, stacks, SIGTERM, SIGKILL: each reported
    cluster.restart(); cluster.close()

Every call that waits on engines has a deadline or returns a handle (RankTasks) at once, so a
cell never freezes because a rank did (IP-01). The monitor (hangkit.monitor.Monitor) runs in
this kernel and every engine runs an agent pointed at it, so every later cell is observed.

Locally the engines start through this machine's mpiexec; inside a PBS job, across the job's
nodes with the PALS flags of hangkit.launcher.mpiexec_command, and the controller and monitor
listen on `bind` (e.g. "0.0.0.0") so engines on other nodes reach them.

The engines run with torch's Flight Recorder on (TORCH_FR_BUFFER_SIZE, unless `environ` sets
it; `flight_recorder=False` turns it off), so stacks() and the dashboard see the collectives
DDP and FSDP issue from C++.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

from hangkit import deadline
from hangkit.agent import engine
from hangkit.errors import HangkitError, UsageError
from hangkit.inject import remove_hook
from hangkit.procfs import remove_unheld_shared_memory, shared_memory_files
from hangkit.records import Diagnosis, ProbeResult, RankState, TreeNode
from hangkit.text import ranks_phrase

log = logging.getLogger(__name__)

START_TIMEOUT = 60.0  # seconds for the controller and every engine to register
CALL_TIMEOUT = 30.0  # seconds for a short call on every engine (info, agent start)
OUTPUT_LINES = 40  # lines of the engines' own output in a start error
# Seconds for mpiexec, hydra's proxies, the shims and the relay to end by themselves at close,
# once the engines are killed (the relay notices its shims gone within a second).
LAUNCHERS_END_WAIT = 5.0
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class ClusterStartError(HangkitError, RuntimeError):
    """The engines did not start or register in time; the message ends with their output."""


class RankTasks:
    """One task per rank, running on the engines; look at it any time, it never blocks
    unless asked to with wait(timeout)."""

    def __init__(self, what: str, results: dict[int, Any]):
        self.what, self.results = what, results
        self.started = time.monotonic()
        self.number: int | None = None  # of an execute()d cell: the engines publish it at its end

    def states(self) -> dict[int, str]:
        """rank -> "running", "done" or "raised"."""
        out = {}
        for rank, ar in self.results.items():
            if not ar.ready():
                out[rank] = "running"
            else:
                out[rank] = "done" if ar.successful() else "raised"
        return out

    def done(self) -> bool:
        return all(ar.ready() for ar in self.results.values())

    def wait(self, timeout: float) -> bool:
        """Waits until every rank's task ended or `timeout` passed; True if all ended."""
        ends_at = time.monotonic() + timeout
        for ar in self.results.values():
            left = ends_at - time.monotonic()
            if left <= 0:
                break
            ar.wait(left)
        return self.done()

    def values(self) -> dict[int, Any]:
        """What each finished rank returned."""
        return {r: ar.get(0) for r, ar in self.results.items()
                if ar.ready() and ar.successful()}

    def errors(self) -> dict[int, str]:
        """rank -> the traceback text of what it raised."""
        out = {}
        for rank, ar in self.results.items():
            if ar.ready() and not ar.successful():
                try:
                    ar.get(0)
                except Exception as e:  # ipyparallel's RemoteError carries the engine's text
                    out[rank] = _remote_traceback(e)
        return out

    def __repr__(self) -> str:
        by_state: dict[str, list[int]] = {}
        for rank, state in sorted(self.states().items()):
            by_state.setdefault(state, []).append(rank)
        parts = [f"{ranks_phrase(r)} {s}" for s, r in by_state.items()]
        return f"<{self.what}: {'; '.join(parts)}; {time.monotonic() - self.started:.0f} s>"


def _remote_traceback(e: BaseException) -> str:
    text = getattr(e, "traceback", None) or ""
    if not text and hasattr(e, "render_traceback"):
        with contextlib.suppress(Exception):
            text = "\n".join(e.render_traceback())
    summary = f"{getattr(e, 'ename', type(e).__name__)}: {getattr(e, 'evalue', e)}"
    text = _ANSI.sub("", text)  # IPython colours the engines' tracebacks
    return f"{text.rstrip()}\n{summary}" if text else summary


class EngineCluster:
    _current: EngineCluster | None = None

    @classmethod
    def current(cls) -> EngineCluster | None:
        """The most recently started cluster that is still running (what `%%hk` runs on)."""
        found = cls._current
        return found if found is not None and found.client is not None else None

    def __init__(self, n: int = 4, *, start_timeout: float = START_TIMEOUT,
                 bind: str | None = None, mpiexec: str | None = None,
                 environ: dict[str, str] | None = None, flight_recorder: bool = True,
                 inject: bool = True):
        if n < 1:
            raise UsageError(f"n must be at least 1 engine, got {n}")
        if not start_timeout > 0 or math.isinf(start_timeout):
            raise UsageError(f"start_timeout must be a positive number of seconds, got "
                             f"{start_timeout}")
        self.n, self.start_timeout = n, start_timeout
        self.bind, self.mpiexec = bind, mpiexec
        self.environ = dict(os.environ if environ is None else environ)
        self.flight_recorder = flight_recorder
        self.inject = inject
        self._hook: str | None = None  # the engines' start-up hook directory
        self.monitor = None
        self.client = None
        self.engines: dict[int, dict] = {}  # rank -> engine.info()
        self._ipp = None
        self._live = None
        self.latest: RankTasks | None = None  # the task interrupt() watches
        self.cells: list = []  # the %%hk cells run on it (magic.CellRun), oldest first
        self._executed = 0  # cells execute()d so far
        self._processes: list = []  # psutil.Process of all the cluster started
        self._shared: set[str] = set()  # the /dev/shm files they hold once started

    # -- starting and stopping --------------------------------------------------------------

    def start(self) -> EngineCluster:
        """Starts the controller, n MPI engines and the monitor; installs the agent on every
        engine. Raises ClusterStartError, with the engines' output, after start_timeout."""
        from hangkit.monitor.server import Monitor

        EngineCluster._current = self  # %%hk runs on the latest started
        self.monitor = Monitor(bind=self.bind or "127.0.0.1")
        before = {p.pid for p in _new_children(set())}
        try:
            try:
                self._start_engines()
            finally:
                self._processes = _new_children(before)
            self._install_agents()
        except BaseException:
            self.close()
            raise
        # The engines' MPI shared memory, mapped by now: engines that are killed (interrupt's
        # escalation, close) cannot remove it, so close() does.
        self._shared = shared_memory_files(p.pid for p in self._launched())
        return self

    def _start_engines(self) -> None:
        import ipyparallel as ipp
        from traitlets.config import Config

        from hangkit.bootstrap import INJECT_VARIABLE
        from hangkit.flight_recorder.environment import recorder_environment
        from hangkit.inject import inject_environment
        from hangkit.launcher import find_mpiexec, mpiexec_command

        config = Config()
        # ipyparallel runs: mpi_cmd -n N mpi_args ipengine ...; inside PBS the args carry
        # --hostfile and --ppn for Cray PALS (faked by MPICH's hydra here).
        config.MPILauncher.mpi_cmd = [self.mpiexec or find_mpiexec()]
        config.MPILauncher.mpi_args = mpiexec_command(self.n, self.environ)[3:]
        # Each engine runs under `hangkit rank`, as a job script's ranks do: its GPU by local
        # rank, and its node's relay, through which engines on other nodes are captured,
        # signalled and ended.
        config.MPIEngineSetLauncher.engine_cmd = [
            sys.executable, "-m", "hangkit", "rank", "--", sys.executable, "-m",
            "ipyparallel.engine"]
        # The engines' collectives, for stacks() and the dashboard (or none, when turned off).
        wanted = recorder_environment(self.environ, on=self.flight_recorder)[0]
        # Every Python process the engines start (a cell's torchrun, its ranks) gets an agent
        # with no change to its code (hangkit/inject.py); close() removes the hook.
        hooked, self._hook = inject_environment(self.environ, on=self.inject)
        wanted.update({k: hooked[k] for k in ("PYTHONPATH", INJECT_VARIABLE) if k in hooked})
        config.MPIEngineSetLauncher.environment = {
            **{k: v for k, v in wanted.items() if self.environ.get(k) != v},
            **self.monitor.environment()}  # for the shims, which start the relays
        self._ipp = ipp.Cluster(engines="mpi", n=self.n, config=config,
                                engine_timeout=max(1, math.ceil(self.start_timeout)),
                                controller_ip=self.bind or "127.0.0.1",
                                log_level=logging.WARNING)
        # start_and_connect_sync waits engine_timeout for registration, but starting the
        # controller has no deadline of its own: the whole start gets one here.
        failure = (f"{self.n} MPI engines did not start and register within "
                   f"{self.start_timeout:g} s")
        try:
            # 10 s more than ipyparallel's own engine_timeout, for its teardown of a failed try.
            self.client = deadline.call(self._ipp.start_and_connect_sync,
                                        timeout=self.start_timeout + 10, name="cluster start")
        except Exception as e:
            why = "no answer" if isinstance(e, deadline.DeadlineExceeded) else \
                f"{type(e).__name__}: {e}"
            raise ClusterStartError(f"{failure} ({why}); their output:\n{self._engine_output()}",
                                    hint="run `hangkit doctor --only mpi` in the same "
                                    "environment") from e

    def _engine_output(self) -> str:
        lines: list[str] = []
        for engine_set in list(getattr(self._ipp, "engines", {}).values()):
            with contextlib.suppress(Exception):
                lines += (engine_set.get_output() or "").splitlines()
        lines = [line for line in lines if line.strip()]
        return "\n".join(lines[-OUTPUT_LINES:]) or "(the engines wrote nothing)"

    def _install_agents(self) -> None:
        view = self.client[:]
        infos = view.apply_async(engine.info).get(timeout=CALL_TIMEOUT)
        self.engines = {eid: info for eid, info in zip(view.targets, infos)}
        wrong = {eid: i["rank"] for eid, i in self.engines.items() if i["rank"] != eid}
        if wrong:
            raise ClusterStartError(f"engine ids are not MPI ranks: {wrong}")
        view.apply_async(engine.start_agent, self.monitor.address,
                         self.monitor.key).get(timeout=CALL_TIMEOUT)
        ends_at = time.monotonic() + CALL_TIMEOUT

        def idle() -> int:  # engines whose agent said so: injected agents beat before that
            return sum(1 for s in self.monitor.statuses() if s.status == RankState.IDLE)

        while idle() < self.n:
            if time.monotonic() > ends_at:
                raise ClusterStartError(f"only {idle()} of {self.n} engines' agents reported "
                                        f"idle to the monitor at {self.monitor.address}")
            time.sleep(0.05)  # ok-sleep: polls the monitor against the deadline above

    @property
    def ranks(self) -> list[int]:
        return sorted(self.engines)

    def close(self) -> None:
        """Stops the dashboard, the engines, the controller and the monitor; idempotent."""
        if self._live is not None:
            self._live.stop()
            self._live = None
        if self.client is not None:
            with contextlib.suppress(Exception):
                self.client.close()
            self.client = None
        if self._ipp is not None:
            import psutil

            from hangkit.monitor.terminate import process_ends_by_itself

            launched = self._launched()
            self._kill_engines()  # first: a rank stuck in C ignores the SIGTERM of stop
            # mpiexec, hydra's proxies, the shims and the relay then end by themselves,
            # cleaning up as they go (hydra's file in /tmp, the relay's socket); stopping the
            # cluster at once would SIGKILL some of them first. Those still there (a relay
            # still answering a request) get SIGTERM, on which they clean up too.
            _, still = psutil.wait_procs([p for p in launched if process_ends_by_itself(p)],
                                         timeout=LAUNCHERS_END_WAIT)
            for p in still:
                with contextlib.suppress(psutil.Error):
                    p.terminate()
            with contextlib.suppress(Exception):
                self._ipp.stop_cluster_sync()
            _end(launched)
            remove_unheld_shared_memory(self._shared)
            self._ipp = None
        if self.monitor is not None:
            self.monitor.close()
            self.monitor = None
        remove_hook(self._hook)
        self._hook = None

    def _launched(self) -> list:
        """Every process the cluster started (the controller and its schedulers, mpiexec and
        its proxies, the engines and their nannies), with their children as of now (DataLoader
        workers). Known by being new children of this process when the cluster started."""
        import psutil

        found = {}
        for p in self._processes:
            with contextlib.suppress(psutil.Error):
                if p.is_running():
                    for q in [p, *p.children(recursive=True)]:
                        found[q.pid] = q
        return list(found.values())

    def _kill_engines(self) -> None:
        """The engines and their children (DataLoader workers), at once: here directly, on
        other nodes through their shims. (A pid of another node means another process here.)"""
        import psutil

        for info in self.engines.values():
            if info["host"] != self.monitor.host:
                continue
            with contextlib.suppress(psutil.Error):
                proc = psutil.Process(info["pid"])
                for p in [proc, *proc.children(recursive=True)]:
                    with contextlib.suppress(psutil.Error):
                        p.kill()
        remote = sorted({i["host"] for i in self.engines.values()} - {self.monitor.host})
        if remote:
            self.monitor.ask_nodes("signal", remote, timeout=CALL_TIMEOUT,
                                   signal=int(signal.SIGKILL), tree=True)

    def __enter__(self) -> EngineCluster:
        return self.start() if self.client is None else self

    def __exit__(self, *exc) -> None:
        self.close()

    def restart(self) -> EngineCluster:
        """New controller and engines (an MPI job cannot lose one rank and go on), the agents
        again; the live dashboard stays. A new controller is quicker than waiting for the old
        one to notice, by missed heartbeats, that its engines are gone."""
        live, self._live = self._live, None
        self.close()
        self.latest = None
        self.start()
        self._live = live
        return self

    # -- running on engines -----------------------------------------------------------------

    def apply(self, fn: Callable, *args, what: str | None = None, **kwargs) -> RankTasks:
        """Runs ``fn(*args, **kwargs)`` on every engine; returns at once."""
        return self._follow(RankTasks(what or getattr(fn, "__name__", "task"), {
            rank: self.client[rank].apply_async(fn, *args, **kwargs) for rank in self.ranks}))

    def execute(self, code: str, ranks: list[int] | None = None) -> RankTasks:
        """Runs `code` in the engines' own namespaces (kept from call to call, as `%%px`
        keeps them), on every engine or on `ranks`; returns at once. `%%hk` runs on this."""
        chosen = self.ranks if ranks is None else ranks
        # Each engine runs its requests in order: it reads "cell" while the code runs (so a
        # rank stuck in it can be stalled, not idle), "idle" once it is done, and publishes
        # the number of the cell it ended, so that "idle" after this cell is told apart from
        # "idle" left over from the one before.
        self._executed += 1
        for rank in chosen:
            self.client[rank].apply_async(engine.cell_started)
        tasks = RankTasks("%%hk", {rank: self.client[rank].execute(code, silent=False,
                                                                   block=False)
                                   for rank in chosen})
        tasks.number = self._executed
        for rank in chosen:
            self.client[rank].apply_async(engine.cell_ended, self._executed)
        return self._follow(tasks)

    def pull(self, name: str, ranks: list[int] | None = None, *,
             timeout: float = CALL_TIMEOUT) -> dict[int, Any]:
        """The value of `name` in each engine's namespace (what `%%hk` cells set), for the
        ranks that answered within `timeout` seconds: {rank: value}."""
        tasks = RankTasks(f"pull {name}", {
            rank: self.client[rank].pull(name, block=False)
            for rank in (self.ranks if ranks is None else ranks)})
        tasks.wait(timeout)
        return tasks.values()

    def _follow(self, tasks: RankTasks) -> RankTasks:
        self.latest = tasks
        if self._live is not None:  # the dashboard shows what a rank raised
            self._live.follow(tasks)
        return tasks

    def setup(self, build: Callable, *args, setup_timeout: float = 120.0,
              **kwargs) -> RankTasks:
        """Builds a StepRunner on every engine with ``build(*args, **kwargs)``; waits up to
        `setup_timeout` (distributed init is in there) and returns the tasks either way."""
        tasks = self.apply(engine.setup, build, *args, what="setup", **kwargs)
        tasks.wait(setup_timeout)
        return tasks

    def steps(self, n: int | None = None) -> RankTasks:
        """Runs n more training steps on every engine (None: to the end); returns at once."""
        if n is not None and n < 1:
            raise UsageError(f"steps must be at least 1, got {n}")
        return self.apply(engine.run_steps, n, what=f"steps({n})")

    def failures(self, timeout: float = CALL_TIMEOUT) -> dict[int, list[str]]:
        """Every rank's tracebacks of the epochs its StepRunner failed (and went on after),
        oldest first; waits up to `timeout` seconds for the engines to answer."""
        tasks = self.apply(engine.failures, what="failures")
        tasks.wait(timeout)
        return tasks.values()

    def histories(self, timeout: float = CALL_TIMEOUT) -> dict[int, list[dict]]:
        """Every rank's per-step phase timings (for hangkit.jupyter.plots)."""
        tasks = self.apply(engine.history, what="history")
        tasks.wait(timeout)
        return tasks.values()

    def doctor(self, only=None, *, timeout: float = 30.0, path: str = ".") -> RankTasks:
        """The doctor's probes on n ranks, started from engine 0 (the engines' nodes and
        environment); returns at once. `doctor_results(task)` gives the ProbeResults."""
        results = {0: self.client[0].apply_async(engine.run_doctor, only, self.n,
                                                 timeout, path)}
        return RankTasks("doctor", results)

    # -- looking and stopping ---------------------------------------------------------------

    def stacks(self) -> tuple[TreeNode | None, list[Diagnosis]]:
        """Every engine's stacks (from its agent; faulthandler or py-spy where it cannot
        answer) and their DataLoader workers', merged, with the diagnoses."""
        from hangkit.jupyter.livestacks import capture_engines

        return capture_engines(self)

    def interrupt(self, ranks: list[int] | None = None, *, grace: float = 3.0,
                  escalate: bool = True) -> list[str]:
        """Escalates on the ranks' engines until their tasks end: SIGINT, a stack dump,
        SIGTERM, SIGKILL, until the latest task (a %%hk cell, steps(), setup(), apply()) has
        ended on them; returns (and logs) one line per step saying what it achieved.
        `escalate=False`: the KeyboardInterrupt alone, which an engine running Python
        survives (say `interrupt([2], escalate=False)` for one rank); a rank inside a C call
        is said to be, with what to do instead."""
        from hangkit.jupyter.escalate import escalate as run

        return run(self, self.ranks if ranks is None else list(ranks), grace=grace,
                   stop_at_sigint=not escalate)

    def signal(self, sig: int, ranks: list[int]) -> None:
        """Sends `sig` to the ranks' engine processes: directly when on this host, else
        through their node's relay (its shims are their parents), or, without one, through
        ipyparallel's control channel."""
        relayed = {n.host for n in self.monitor.nodes()}
        by_host: dict[str, list[int]] = {}
        for rank in ranks:
            info = self.engines[rank]
            if info["host"] == self.monitor.host:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(info["pid"], sig)
            else:
                by_host.setdefault(info["host"], []).append(rank)
        for host, there in by_host.items():
            if host in relayed:
                self.monitor.ask_nodes("signal", [host], timeout=CALL_TIMEOUT, signal=int(sig),
                                       ranks=[f"rank {r}" for r in there])
            else:
                self.client.send_signal(signal.Signals(sig).name, targets=there, block=False)

    # -- the dashboard ------------------------------------------------------------------------

    @property
    def live(self):
        """The LiveDashboard shown by dashboard(), or None."""
        return self._live

    def dashboard(self, total_steps: int | None = None, *, interval: float = 1.0):
        """The live dashboard of this cluster, displayed and updated about once a second from
        a background thread (the kernel stays free)."""
        from hangkit.jupyter.live import LiveDashboard

        if self._live is not None:
            self._live.stop()
        self._live = LiveDashboard(self, total_steps=total_steps, interval=interval)
        self._live.start()
        return self._live


def _new_children(before: set[int]) -> list:
    """This process's descendants that were not there `before` (pids)."""
    import psutil

    return [p for p in psutil.Process().children(recursive=True) if p.pid not in before]


def _end(processes: list, timeout: float = 5.0) -> None:
    """Waits for these processes to exit, and kills those that do not in time."""
    import psutil

    _, alive = psutil.wait_procs(processes, timeout=timeout)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(alive, timeout=timeout)


def doctor_results(task: RankTasks, timeout: float = 0) -> list[ProbeResult]:
    """The ProbeResults of cluster.doctor() (waits up to `timeout` seconds; [] if not done)."""
    task.wait(timeout)
    values = task.values()
    return [ProbeResult.from_json(d) for d in values.get(0, [])]
