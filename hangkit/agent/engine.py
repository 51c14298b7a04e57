"""What runs inside each ipyparallel MPI engine: module functions the notebook kernel's
EngineCluster applies by reference (so the engines import this module by name).

An engine is a rank like any other, so this is rank-side code and lives with the agent. The
engine keeps its training between cells here (one StepRunner per engine), so that a notebook
can run N steps, look at the dashboard, and run N more. Nothing here imports widgets; torch and
mpi4py are imported by the user's setup function, hangkit.training and the doctor only when
called.
"""

from __future__ import annotations

import os
import socket

_runner = None  # the StepRunner that setup() built on this engine
CELL_ENDED = "hk_cell_ended"  # the published name of the number of the last cell done


def info() -> dict:
    """Who this engine is: its MPI rank (from the launcher's variables), pid and host."""
    from hangkit.rankenv import rank_from_environ, world_size_from_environ

    env = dict(os.environ)
    return {"rank": rank_from_environ(env), "size": world_size_from_environ(env),
            "pid": os.getpid(), "host": socket.gethostname()}


def start_agent(address: str, key: str) -> bool:
    """Starts this engine's agent and reports it idle, so the monitor sees it at once."""
    from hangkit.agent import start_agent as start
    from hangkit.shim import RELAY_VARIABLE

    os.environ["HANGKIT_MONITOR"], os.environ["HANGKIT_MONITOR_KEY"] = address, key
    # An engine under `hangkit rank` reports through its node's relay.
    started = start(os.environ.get(RELAY_VARIABLE) or address, key) is not None
    _idle()
    return started


def setup(fn, *args, **kwargs) -> dict:
    """Builds this engine's StepRunner with `fn(*args, **kwargs)`; closes the one before."""
    global _runner
    if _runner is not None:
        _runner.close()
    try:
        _runner = fn(*args, **kwargs)
    finally:
        _idle()
    return summary()


def run_steps(steps: int | None) -> dict:
    """Runs `steps` more steps (None: to the end) of this engine's runner."""
    if _runner is None:
        raise RuntimeError("no training on this engine: call cluster.setup(build_runner) first")
    try:
        _runner.run(steps=steps)
    finally:
        _idle()
    return summary()


def _idle() -> None:
    """Between cells an engine waits by intent: the monitor shows it idle, never stalled."""
    from hangkit.agent import progress

    progress(phase="idle")


def cell_started() -> None:
    """A %%hk cell runs next: the engine is working, and may stall, until cell_ended()."""
    from hangkit.agent import progress

    progress(phase="cell")


def cell_ended(number: int) -> None:
    """The cell `number` (the cluster's count) is done: published with the idle beat, so the
    notebook can wait for the beat that came after it."""
    from hangkit.agent import publish

    publish(CELL_ENDED, number)
    _idle()


def summary() -> dict:
    s = _runner.state
    return {"step": s.step, "epoch": s.epoch, "finished": s.finished,
            "failed_epochs": len(s.failed_epochs), "metrics": dict(s.last_metrics)}


def failures() -> list[str]:
    """The tracebacks of this engine's failed epochs, oldest first."""
    return [] if _runner is None else list(_runner.state.failed_epochs)


def history() -> list[dict]:
    """Per-step phase timings of this engine's runner, oldest first (for the plots)."""
    return [] if _runner is None else list(_runner.state.history)


def run_doctor(only, ranks: int, timeout: float, path: str) -> list[dict]:
    """The doctor, started from engine 0 so its probe jobs see the engines' environment (the
    same nodes, variables and modules). The launcher variables of this engine's own MPI job
    are left out of the probe jobs' environment: a nested mpiexec must start a job of its own."""
    from hangkit.probes.runner import run_doctor as doctor

    inherited = {k: os.environ.pop(k) for k in list(os.environ)
                 if k.startswith(("PMI_", "PMIX_", "HYDRA_", "MPIR_", "PALS_"))}
    try:
        return [r.to_json() for r in doctor(only, ranks=ranks, timeout=timeout, path=path)]
    finally:
        os.environ.update(inherited)
