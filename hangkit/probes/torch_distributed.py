"""torch_distributed: a gloo process group built from the job's environment, as training's
init_process_group(init_method="env://") would build it; an all_reduce and a barrier in it; the
same with nccl where GPUs are visible (one per local rank). Every step has its own deadline.

Guards against TD-05, the rendezvous that never completes: a MASTER_ADDR where rank 0 is not,
a MASTER_PORT still held by an earlier run, a WORLD_SIZE larger than the ranks launched, ranks
that cannot connect to each other. The steps are those of env:// init, done one by one so that
the probe can say how far it got:

1. store: rank 0 opens a TCPStore on MASTER_PORT and waits for every rank to connect to
   MASTER_ADDR:MASTER_PORT ("1/3 clients joined" is TD-05's signature);
2. process group: each rank publishes its own address in the store and connects to every
   other rank (gloo's full mesh: this is where hosts that cannot reach each other hang);
3. all_reduce (the result is checked) and a barrier (gloo's monitored_barrier, which names
   the ranks that did not arrive).

What the probe uses, and why:
- rank and world size: RANK and WORLD_SIZE when set (env:// reads them, so a mis-set one is
  what training would hit), else the launcher's (PMI_RANK/PMI_SIZE, PALS, Open MPI). A
  difference between the two is named in the result. Without --ranks: rank 0 of 1.
- MASTER_ADDR: under --ranks in a PBS job, the first host of PBS_NODEFILE (where rank 0 runs,
  as mpiexec is given --hostfile $PBS_NODEFILE); else MASTER_ADDR; else 127.0.0.1 when all
  ranks are on one host. Rank 0 first checks that the address is its own (else the others
  would look for the store where it is not).
- MASTER_PORT: from the environment when set. Otherwise the ranks must agree on one without
  a store to agree through. A port derived from a shared value (say PBS_JOBID) can be held by
  anything, and two doctors in one job would collide; so where the ranks were started by an
  MPI launcher and mpi4py is installed, MPI rank 0 asks the kernel for a free port and
  broadcasts it (non-blocking, against the deadline). Only without MPI is it derived from
  PBS_JOBID. A single rank lets the store pick a free port itself.

Each step runs under hangkit.deadline until just before the doctor's deadline (torch's calls
release the GIL), so a step that never completes is the probe's own "timeout",
naming the step and what was done before it. Each is also announced on stderr first
("torch_distributed: rank 1/2: TCPStore: ..."): the doctor reports that line for a probe it
had to kill, as it would one stuck in MPI_Init while sharing the port.
"""

from __future__ import annotations

import contextlib
import errno
import importlib.util
import os
import re
import socket
import time
from datetime import timedelta

from hangkit import deadline
from hangkit.launcher import derived_port, job_nodes, port_holder, wait_for_listener
from hangkit.probes.api import Outcome, ProbeContext, fail, ok, skipped, timed_out, warn
from hangkit.probes.environment import LOCAL_SIZE_VARIABLES
from hangkit.probes.mpi import launcher_rank, wait_request
from hangkit.rankenv import local_rank_from_environ

# Seconds each step's own timeout leaves before the doctor's deadline: torch's store timeouts
# overrun theirs by up to a second, and the result must still be written.
MARGIN = 2.5
# Seconds before the doctor's deadline at which the probe stops waiting for a step and reports.
JOIN_MARGIN = 1.0

TD05_ADVICE = (
    "TD-05 (rendezvous): every rank must reach the store at MASTER_ADDR:MASTER_PORT, and "
    "WORLD_SIZE must equal the number of ranks launched. In a PBS job: export "
    "MASTER_ADDR=$(head -1 $PBS_NODEFILE) (rank 0's host), a MASTER_PORT that no earlier run "
    "or notebook cell still holds (ss -ltnp | grep PORT), and RANK/WORLD_SIZE from the "
    "launcher (RANK=$PMI_RANK WORLD_SIZE=$PMI_SIZE) or unset. Ranks that reach the store but "
    "not each other resolve their hostnames to an interface the others cannot route to: set "
    "GLOO_SOCKET_IFNAME (and NCCL_SOCKET_IFNAME) to the high-speed network's interface.")
COLLECTIVE_ADVICE = (
    "The process group formed but a collective did not complete on every rank: look at the "
    "other ranks' rows for the one that failed first (TD-03, TD-04). If all are stuck in the "
    "same step, traffic between the ranks' hosts is blocked after the rendezvous: check "
    "GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME and, for nccl, the NCCL_* and FI_* settings the "
    "environment probe lists.")


class _StepFailed(Exception):
    def __init__(self, outcome: Outcome):
        super().__init__(outcome.detail)
        self.outcome = outcome


def run(ctx: ProbeContext) -> Outcome:
    if importlib.util.find_spec("torch") is None:
        return skipped("torch is not installed")
    # torch's C++ warnings carry stack traces of many lines; the doctor reports a killed
    # probe by its last line on stderr, which must stay this probe's own progress line.
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "FATAL")
    probe = _Probe(ctx)
    try:
        return probe.run()
    except _StepFailed as e:
        outcome = e.outcome
        notes = "; ".join(probe.notes)
        if notes and notes not in outcome.detail:
            outcome.detail += f"; {notes}"
        outcome.data.update(probe.data)
        return outcome


class _Probe:
    def __init__(self, ctx: ProbeContext):
        self.ctx = ctx
        self.env = ctx.environ
        self.notes: list[str] = []  # findings that explain a failure if one comes
        self.seconds: dict[str, float] = {}
        self.data: dict = {"seconds": self.seconds}
        self.who = "no launcher" if ctx.rank is None else f"rank {ctx.rank}/{ctx.world_size}"

    def say(self, step: str) -> None:
        self.ctx.say(step)

    # -- the plan: rank, world size, address and port ------------------------------------

    def ranks(self) -> tuple[int, int]:
        env, ctx = self.env, self.ctx
        declared = {k: env[k] for k in ("RANK", "WORLD_SIZE") if env.get(k, "").strip()}
        if ctx.rank is None:
            if declared.get("WORLD_SIZE", "1") != "1":
                self.notes.append(f"WORLD_SIZE={declared['WORLD_SIZE']} is set in this "
                                  "environment, which started no other ranks: "
                                  "init_process_group(init_method='env://') here would wait "
                                  "for ranks that do not exist")
            return 0, 1
        rank, size = ctx.rank, ctx.world_size or 1
        for name, launched in (("RANK", rank), ("WORLD_SIZE", size)):
            value = declared.get(name)
            if value is None:
                continue
            if not value.isdigit():
                raise _StepFailed(fail(f"{name}={value!r} is not a number", TD05_ADVICE))
            if int(value) != launched:
                self.notes.append(f"{name}={value} in the environment, but the launcher "
                                  f"started this process as rank {rank} of {size}")
        rank = int(declared.get("RANK", rank))
        size = int(declared.get("WORLD_SIZE", size))
        if not 0 <= rank < size:
            raise _StepFailed(fail(f"rank {rank} is not below the world size {size}: "
                                   "init_process_group would refuse it", TD05_ADVICE))
        return rank, size

    def address(self, size: int) -> tuple[str, str]:
        env = self.env
        # Without --ranks this process is rank 0 of 1 wherever it runs, and hosts the store
        # itself: the job's first host is not where it is unless it happens to run there.
        nodes = job_nodes(env) if self.ctx.rank is not None else []
        if nodes:
            given = env.get("MASTER_ADDR")
            if given and given.split(".")[0] != nodes[0].split(".")[0]:
                self.notes.append(f"MASTER_ADDR={given} in the environment is not the first "
                                  f"host of PBS_NODEFILE ({nodes[0]}), where rank 0 runs")
            return nodes[0], "first host of PBS_NODEFILE"
        if env.get("MASTER_ADDR"):
            return env["MASTER_ADDR"], "MASTER_ADDR"
        local = next((int(env[v]) for v in LOCAL_SIZE_VARIABLES if env.get(v, "").isdigit()),
                     None)
        launched = self.ctx.world_size or 1
        if local is not None and local < launched and self.ctx.rank is not None:
            raise _StepFailed(fail(
                f"{launched} ranks on several hosts ({local} on this one) and neither "
                "PBS_NODEFILE nor MASTER_ADDR says where rank 0 is", TD05_ADVICE))
        return "127.0.0.1", "one host"

    def port(self, size: int):
        """(port, how it was chosen); port 0 lets a lone store pick a free one."""
        env = self.env
        if env.get("MASTER_PORT"):
            value = env["MASTER_PORT"].strip()
            if not value.isdigit() or not 0 < int(value) < 65536:
                raise _StepFailed(fail(f"MASTER_PORT={value!r} is not a port number",
                                       TD05_ADVICE))
            return int(value), "MASTER_PORT"
        if size == 1:
            return 0, "a free port"
        if launcher_rank(env) and importlib.util.find_spec("mpi4py") is not None:
            return self.port_through_mpi(), "a free port rank 0 shared through MPI"
        if env.get("PBS_JOBID"):
            port = derived_port(env["PBS_JOBID"])
            return port, "derived from PBS_JOBID"
        raise _StepFailed(fail(
            "MASTER_PORT is not set and these ranks have no way to agree on one (no MPI "
            "launcher with mpi4py, no PBS_JOBID)",
            "Export MASTER_PORT (a free port, the same on every rank) before launching. "
            + TD05_ADVICE))

    def port_through_mpi(self) -> int:
        from array import array

        from hangkit.probes.mpi import import_mpi

        self.say("MPI_Init to share MASTER_PORT (set MASTER_PORT to skip this): waits "
                 "until every rank has started MPI")
        started = time.monotonic()
        try:
            MPI = import_mpi()
            MPI.Init_thread()
        except Exception as e:
            raise _StepFailed(fail(f"MPI_Init failed, so no MASTER_PORT could be shared: {e}",
                                   "Export MASTER_PORT (the same free port on every rank), "
                                   "and see the mpi probe's row.")) from e
        comm = MPI.COMM_WORLD
        port = array("q", [0])
        if comm.Get_rank() == 0:
            # A port the kernel just handed out is free now; the store binds it a few
            # milliseconds later, after the broadcast.
            with socket.socket() as s:
                s.bind(("", 0))
                port[0] = s.getsockname()[1]
        self.say("MPI_Ibcast of MASTER_PORT from MPI rank 0")
        if not wait_request(comm.Ibcast([port, MPI.INT64_T], root=0), self.ctx, MARGIN):
            raise _StepFailed(timed_out(
                f"MPI rank 0 could not share a port within {time.monotonic() - started:.1f} s "
                "(MPI broadcast incomplete): see the mpi probe", TD05_ADVICE))
        self.seconds["mpi_port"] = round(time.monotonic() - started, 4)
        return int(port[0])

    # -- the steps -----------------------------------------------------------------------

    def budget(self) -> timedelta:
        return timedelta(seconds=max(self.ctx.remaining(MARGIN), 0.5))

    def run(self) -> Outcome:
        import torch
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_gloo_available():
            return skipped(f"torch {torch.__version__} is built without torch.distributed "
                           "or gloo")
        rank, size = self.ranks()
        addr, addr_from = self.address(size)
        port, port_from = self.port(size)
        self.who = f"rank {rank}/{size}"
        self.data.update(rank=rank, world_size=size, master_addr=addr, master_port=port,
                         master_addr_from=addr_from, master_port_from=port_from)
        if rank == 0:
            self.check_local(addr)

        store = self.store(dist, addr, port, rank, size)
        self.data["master_port"] = port = store.port
        where = f"store at {addr}:{port} ({addr_from}; port: {port_from})"
        self.step("process group", "init_process_group('gloo'): each rank publishes its "
                  "address in the store and connects to every other rank",
                  lambda t: dist.init_process_group("gloo", store=store, rank=rank,
                                                    world_size=size, timeout=t))
        total = torch.tensor([rank, 1], dtype=torch.int64)
        self.step("all_reduce", "all_reduce (sum of ranks) in gloo: waits for every rank",
                  lambda t: dist.all_reduce(total, async_op=True).wait(timeout=t))
        expected = [size * (size - 1) // 2, size]
        if total.tolist() != expected:
            raise _StepFailed(fail(f"gloo all_reduce returned {total.tolist()}, expected "
                                   f"{expected} (sum of ranks, count of ranks)",
                                   COLLECTIVE_ADVICE))
        self.step("barrier", "monitored_barrier in gloo: waits for every rank",
                  lambda t: dist.monitored_barrier(timeout=t, wait_all_ranks=True))
        nccl = self.nccl(torch, dist, rank, size)
        self.say("destroy_process_group")
        dist.destroy_process_group()

        took = ", ".join(f"{k} {_took(v)}" for k, v in self.seconds.items())
        detail = f"gloo on {size} rank(s), {where}: {took}; nccl: {nccl}"
        if self.notes:
            return warn("; ".join(self.notes) + f" ({detail})", TD05_ADVICE, **self.data)
        return ok(detail, **self.data)

    def check_local(self, addr: str) -> None:
        """Rank 0 hosts the store, so MASTER_ADDR must be one of its host's addresses, or the
        others look for the store where it is not; binding to it says so at once."""
        self.say(f"checking that MASTER_ADDR={addr} is this host ({socket.gethostname()})")
        try:
            with socket.socket() as s:
                s.bind((addr, 0))
        except socket.gaierror as e:
            raise _StepFailed(fail(f"MASTER_ADDR={addr} does not resolve here: {e}",
                                   TD05_ADVICE)) from e
        except OSError as e:
            if e.errno != errno.EADDRNOTAVAIL:
                return
            raise _StepFailed(fail(
                f"MASTER_ADDR={addr} is not an address of rank 0's host "
                f"({socket.gethostname()}): rank 0 opens the store here, and the other ranks "
                f"would wait for it at {addr}", TD05_ADVICE)) from e

    def store(self, dist, addr: str, port: int, rank: int, size: int):
        role = (f"opening the store on port {port or 'any'} and waiting for {size - 1} "
                "other rank(s) to connect" if rank == 0 else
                f"connecting to the store at {addr}:{port}")

        def create(timeout: timedelta):
            if rank != 0:
                self.reach(addr, port)
                timeout = self.budget()
            # As env:// does (torch's _create_c10d_store): rank 0 hosts it and waits for all.
            return dist.TCPStore(addr, port, size, rank == 0, timeout, wait_for_workers=True,
                                 multi_tenant=True)

        return self.step("store", f"TCPStore: {role}", create, port=port)

    def reach(self, addr: str, port: int) -> None:
        """Connects to the store's port by hand until something accepts, so that a failure
        says which: refused (nothing listens: rank 0 has not opened the store there), timed
        out or unreachable (no route to MASTER_ADDR), or accepted by something that is not a
        store (TCPStore's handshake fails next). TCPStore's client would retry all of these
        alike, with backoff, overrunning its timeout up to twofold. (The store ignores a
        connection that closes without a word.)"""
        started = time.monotonic()
        try:
            wait_for_listener(addr, port, started + self.ctx.remaining(MARGIN), retry=0.2)
        except TimeoutError as e:
            raise TimeoutError(f"timed out: nothing accepted a connection at {addr}:{port} "
                               f"in {time.monotonic() - started:.1f} s (last: {e}); "
                               "rank 0 has not opened the store there") from None

    def step(self, name: str, what: str, call, port: int | None = None):
        """Runs call(timeout) in a thread and waits for it until just before the doctor's
        deadline. torch gets its own timeout a little earlier, as its messages say more
        ("1/3 clients joined"), but overruns it at times (store clients retry with backoff);
        torch's calls release the GIL, so the wait here ends on time whatever torch does, and
        a call still blocked is this probe's timeout, not a process the doctor has to kill."""
        self.say(what)
        timeout = self.budget()
        started = time.monotonic()
        try:
            result = deadline.call(lambda: call(timeout), timeout=self.ctx.remaining(JOIN_MARGIN),
                                   name=f"torch_distributed {name}")
        except deadline.DeadlineExceeded:
            took = time.monotonic() - started
            error = TimeoutError(f"timed out: still blocked in the {name} step after "
                                 f"{took:.1f} s, past its own timeout")
            raise _StepFailed(self.failed(name, error, took, timeout, port)) from None
        except Exception as e:
            raise _StepFailed(self.failed(name, e, time.monotonic() - started, timeout,
                                          port)) from e
        self.seconds[name] = round(time.monotonic() - started, 4)
        return result

    def failed(self, name: str, error: Exception, took: float, timeout: timedelta,
               port: int | None) -> Outcome:
        message = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
        message = message.rstrip(".")
        if name == "process group" and "wait timeout" in message:
            message += (" (the keys of ranks that never published their address: they did not "
                        "reach this step)")
        if "Ping failed" in message:  # the store's handshake got another protocol's bytes
            message += (f" (something other than rank 0's store answers at "
                        f"{self.data.get('master_addr')}:{port})")
        done = ", ".join(f"{k} {_took(v)}" for k, v in self.seconds.items()) or "nothing"
        where = (f"{name} step failed after {took:.1f} s (its timeout "
                 f"{timeout.total_seconds():.0f} s; done before it: {done}): "
                 f"{type(error).__name__}: {message}")
        advice = TD05_ADVICE if name in ("store", "process group") else COLLECTIVE_ADVICE
        if port and "EADDRINUSE" in str(error):
            holder = port_holder(port)
            return fail(f"{name} step: MASTER_PORT {port} is already in use"
                        + (f" by {holder}" if holder else "")
                        + " (EADDRINUSE): rank 0 cannot open the store there", advice)
        if isinstance(error, TimeoutError) or re.search(r"time[ds]? ?out", str(error), re.I):
            return timed_out(where, advice)
        return fail(where, advice)

    def nccl(self, torch, dist, rank: int, size: int) -> str:
        if not torch.cuda.is_available():
            return "skipped (no GPU visible: torch.cuda.is_available() is False)"
        if not dist.is_nccl_available():
            return f"skipped (torch {torch.__version__} is built without nccl)"
        local = local_rank_from_environ(self.env)
        local = rank if local is None else local
        device = local % torch.cuda.device_count()
        torch.cuda.set_device(device)
        group = self.step("nccl group", f"new_group('nccl') on cuda:{device}",
                          lambda t: dist.new_group(backend="nccl", timeout=t))
        value = torch.tensor([rank, 1], dtype=torch.int64, device=f"cuda:{device}")

        def collective(t):
            torch.cuda.set_device(device)  # the current device is per thread
            dist.all_reduce(value, group=group)
            torch.cuda.synchronize(device)  # NCCL completes on the GPU; a hang blocks here

        self.step("nccl all_reduce", f"all_reduce in nccl on cuda:{device}", collective)
        if value.tolist() != [size * (size - 1) // 2, size]:
            raise _StepFailed(fail(f"nccl all_reduce returned {value.tolist()}",
                                   COLLECTIVE_ADVICE))
        with contextlib.suppress(Exception):
            dist.destroy_process_group(group)
        return f"all_reduce on cuda:{device} {_took(self.seconds['nccl all_reduce'])}"


def _took(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms" if seconds < 0.1 else f"{seconds:.2f} s"
