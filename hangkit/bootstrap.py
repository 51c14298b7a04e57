"""What every Python process of a watched job runs at start, as its `sitecustomize`.

`hangkit watch`, `hangkit rank` and EngineCluster copy this file as `sitecustomize.py` into a
private directory (hangkit/inject.py) at the front of the job's PYTHONPATH, the way
coverage.py, ddtrace-run and opentelemetry-instrument reach the processes of a program they did
not write. So a training script that never imports hangkit still gets an agent in every rank:
its stacks while the main thread waits, its live collective, its Flight Recorder dump.

Every Python process of the job runs it: ranks, but also DataLoader workers, torch.compile's
workers, `python -c` helpers, pip, torchrun. So it does one cheap check on what it already has
(the environment, argv) and imports nothing of hangkit unless the process is a rank:

- a process with a launcher's rank variables (or the watched command itself) that runs a
  script or a module, is no launcher, and descends from no rank that has an agent: the agent
  starts now;
- any other process gets a hook that waits for `torch.distributed.distributed_c10d` to be
  imported and wraps its `init_process_group`: a process that creates a process group is a
  rank (Lightning numbers its spawned ranks inside the process, mp.spawn's children have no
  variables at all), and its agent starts then. An agent already running takes its rank and
  world size from the default group there.

Then it hands over to the site's own `sitecustomize` (the next one on sys.path; `usercustomize`
is imported by site.py after this, untouched) and takes its directory off sys.path, so the
program sees the path it would have seen. A failure of hangkit's own prints one line and the
program runs on; an interpreter that cannot import the agent (another Python, no pyzmq) runs
unchanged, and a note in the hook directory says why, for the report.

It imports only os and sys at start, and must stay standalone: it runs as a top-level module
in any interpreter the job uses. The rank and launcher names live here, for hangkit too.
"""

import os
import sys

# Variables that carry a process's rank, in the order launchers are checked: MPI's and the
# schedulers' first (a job script may export WORLD_SIZE of its own), RANK last; under torchrun
# (TORCHELASTIC_RUN_ID) its RANK comes first (rankenv.py): an mpiexec or srun around it set
# theirs per node, for torchrun itself.
RANK_VARIABLES = ("PMI_RANK", "PMIX_RANK", "OMPI_COMM_WORLD_RANK", "PALS_RANKID",
                  "SLURM_PROCID", "RANK")
SIZE_VARIABLES = ("PMI_SIZE", "PMIX_SIZE", "OMPI_COMM_WORLD_SIZE", "PALS_SIZE",
                  "SLURM_NTASKS", "WORLD_SIZE")
# A process's rank on its own node (which GPU it takes).
LOCAL_RANK_VARIABLES = ("PALS_LOCAL_RANKID", "MPI_LOCALRANKID", "OMPI_COMM_WORLD_LOCAL_RANK",
                        "SLURM_LOCALID", "LOCAL_RANK")
TORCHRUN_VARIABLE = "TORCHELASTIC_RUN_ID"  # set by torchrun for the ranks it starts

# The hook directory this job's processes take as theirs (hangkit/inject.py sets it).
INJECT_VARIABLE = "HANGKIT_INJECT"
# hangkit watch's pid: the command it runs is the job's main process, rank variables or not.
WATCHER_VARIABLE = "HANGKIT_WATCHER_PID"
# Set by a process once it is known to be a rank: its descendants (helpers, compile workers,
# spawned DataLoader workers) are not, whatever variables they inherit.
RANK_PID_VARIABLE = "HANGKIT_RANK_PID"
# In the hook directory: why the rank with this pid has no agent.
NO_AGENT_PREFIX = "no-agent-"
MONITOR_VARIABLES = ("HANGKIT_MONITOR", "HANGKIT_MONITOR_KEY")

# Programs that start ranks and are none (Python ones: the others never run this file).
LAUNCHER_PROGRAMS = frozenset({"torchrun", "accelerate", "deepspeed", "lightning", "hangkit"})
LAUNCHER_MODULES = frozenset({
    "torch.distributed.run", "torch.distributed.launch", "accelerate.commands.launch",
    "accelerate.commands.accelerate_cli", "deepspeed.launcher.runner",
    "deepspeed.launcher.launch", "hangkit", "hangkit.shim.relay", "mpi4py.run",
})
_DISTRIBUTED_MODULE = "torch.distributed.distributed_c10d"


def python_program(argv):
    """What a Python interpreter's argv runs: ("-m", module), ("script", its basename),
    ("-c", None), or (None, None) for an interactive interpreter or stdin. Options before it
    are skipped as the interpreter does (-W and -X take a value; flags combine: -uc, -Bm)."""
    i = 1
    while i < len(argv):
        word = argv[i]
        if word == "-" or not word.startswith("-"):
            return ("script", os.path.basename(word)) if word != "-" else (None, None)
        if word.startswith("--"):
            i += 2 if word == "--check-hash-based-pycs" else 1
            continue
        for j, flag in enumerate(word[1:], 1):
            rest = word[j + 1:]
            if flag == "c":
                return "-c", None
            if flag == "m":
                module = rest or (argv[i + 1] if i + 1 < len(argv) else None)
                return ("-m", module) if module else (None, None)
            if flag in "WX":
                i += 0 if rest else 1  # the value is the rest of the word, or the next word
                break
        i += 1
    return None, None


def is_launcher_program(kind, name) -> bool:
    if kind == "-m":
        return name in LAUNCHER_MODULES
    return kind == "script" and name in LAUNCHER_PROGRAMS


def _is_rank_at_start(env, argv) -> bool:
    kind, name = python_program(argv)
    if kind not in ("script", "-m") or is_launcher_program(kind, name):
        return False  # `python -c` (multiprocessing's children among them), a launcher
    if env.get(RANK_PID_VARIABLE, str(os.getpid())) != str(os.getpid()):
        return False  # below a rank: a helper it started
    if env.get(WATCHER_VARIABLE) == str(os.getppid()):
        return True
    return any(n in env for n in RANK_VARIABLES) or any(n in env for n in LOCAL_RANK_VARIABLES)


def _note_no_agent(here, why) -> None:
    try:
        path = os.path.join(here, f"{NO_AGENT_PREFIX}{os.getpid()}")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(why[:500])
    except OSError:
        pass


def _import_agent(here):
    """hangkit's agent and pyzmq from this interpreter's packages, else hangkit from the hook
    directory's link to watch's own (only for this import: the program's sys.path stays as it
    was, and pyzmq must be this interpreter's)."""
    try:
        from hangkit.agent import sidecar
    except ImportError:
        for name in [m for m in sys.modules if m == "hangkit" or m.startswith("hangkit.")]:
            del sys.modules[name]  # what the first try left half-imported
        sys.path.append(here)
        try:
            from hangkit.agent import sidecar
        finally:
            sys.path.remove(here)
    import zmq  # noqa: F401  (the agent's one dependency beyond the stdlib)

    return sidecar


def _start_agent(here, rank=None, world_size=None) -> None:
    env = os.environ
    env[RANK_PID_VARIABLE] = str(os.getpid())
    try:
        sidecar = _import_agent(here)
    except ImportError as e:  # another Python, or one without pyzmq: the program runs as is
        _note_no_agent(here, f"its interpreter ({sys.executable}, Python "
                             f"{sys.version.split()[0]}) cannot import hangkit's agent: {e}")
        return
    try:
        agent = sidecar.start_agent(rank=rank, world_size=world_size)
    except Exception as e:
        _note_no_agent(here, f"its agent failed to start: {type(e).__name__}: {e}")
        _say(f"no agent in this rank (pid {os.getpid()}): {type(e).__name__}: {e}")
        return
    if agent is None:
        _note_no_agent(here, "its agent had no monitor to report to")
    elif rank is not None:
        agent.rank, agent.world_size = rank, world_size


def _say(line) -> None:
    try:  # noqa: SIM105 (contextlib is one import more in every process)
        sys.stderr.write(f"hangkit: {line}\n")
    except Exception:
        pass


class _WhenDistributed:
    """A meta-path hook that fires once, when torch.distributed's c10d module is imported,
    and wraps its init_process_group. Every other import costs it one comparison."""

    def __init__(self, here):
        self.here = here

    def find_spec(self, name, path=None, target=None):
        if name != _DISTRIBUTED_MODULE:
            return None
        try:
            sys.meta_path.remove(self)
            import importlib.util

            spec = importlib.util.find_spec(name)
            loader = getattr(spec, "loader", None)
            if loader is None or not hasattr(loader, "exec_module"):
                return spec
            exec_module, here = loader.exec_module, self.here

            def exec_and_wrap(module):
                exec_module(module)
                _wrap_init(module, here)

            loader.exec_module = exec_and_wrap
            return spec
        except Exception as e:
            _say(f"cannot watch for torch.distributed's process group: {type(e).__name__}: {e}")
            return None


def _wrap_init(c10d, here) -> None:
    original = c10d.init_process_group

    def init_process_group(*args, **kwargs):
        result = original(*args, **kwargs)
        try:
            _became_rank(c10d, here)
        except Exception as e:  # the job's process group is up: nothing of ours may undo it
            _say(f"no agent for this rank (pid {os.getpid()}): {type(e).__name__}: {e}")
        return result

    init_process_group.__wrapped__ = original
    for name in ("__doc__", "__name__", "__qualname__", "__module__"):
        setattr(init_process_group, name, getattr(original, name, None))
    c10d.init_process_group = init_process_group


def _became_rank(c10d, here) -> None:
    """The process group exists: its rank and size are this process's, agent or not yet."""
    if not c10d.is_initialized():
        return
    rank, size = c10d.get_rank(), c10d.get_world_size()
    running = sys.modules.get("hangkit.agent.sidecar")
    agent = running.current_agent() if running is not None else None
    if agent is not None:
        agent.rank, agent.world_size = rank, size
    else:  # below a rank or not, a process with a process group is a rank (Lightning's
        _start_agent(here, rank, size)  # are started by its rank 0, after that one's agent)


def _chain_site_customize(here) -> None:
    """The site's own sitecustomize, as site.py would have imported it without us; our
    directory leaves sys.path first, so the program never sees it."""
    sys.path[:] = [p for p in sys.path if os.path.realpath(p or os.curdir) != here]
    # This file leaves sys.modules so that the import below finds the next one; importlib
    # looks its name up once this file has run, so something must stand there again.
    ours = sys.modules.pop("sitecustomize")
    try:
        import sitecustomize  # noqa: F401
    except ImportError as e:
        sys.modules["sitecustomize"] = ours
        if e.name != "sitecustomize":
            raise
    except BaseException:
        sys.modules["sitecustomize"] = ours
        raise


def _main() -> None:
    here = os.path.dirname(os.path.realpath(__file__))
    try:
        _chain_site_customize(here)
    finally:  # a failing sitecustomize of the site's is reported by site.py, after ours ran
        env = os.environ
        if env.get(INJECT_VARIABLE) == here and all(n in env for n in MONITOR_VARIABLES):
            try:
                if _is_rank_at_start(env, getattr(sys, "orig_argv", sys.argv)):
                    _start_agent(here)
                sys.meta_path.insert(0, _WhenDistributed(here))
            except Exception as e:
                _say(f"hangkit's start-up hook failed: {type(e).__name__}: {e}")


if __name__ == "sitecustomize":
    _main()
