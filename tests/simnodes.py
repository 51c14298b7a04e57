"""Several compute nodes simulated on this one machine, for tests of real multi-node jobs.

    import simnodes

    nodes = simnodes.nodes  # the fixture: two nodes sharing tmp_path

    def test_job(nodes):
        done = nodes.run(0, [MPIEXEC, "-n", "4", "-ppn", "2", "--hostfile", nodes.nodefile,
                             sys.executable, "prog.py"], timeout=120)

(An assignment rather than `from simnodes import nodes`: ruff takes the test's argument for a
redefinition of an unused import.)

Real jobs span nodes, and what a watcher can see and do changes with that: a process on
another node has no /proc entry here, and no signal or ptrace reaches it. So each node here is
a PID, UTS and mount namespace (unshare) with its own hostname (hknode0, hknode1, ...), its own
/etc/hosts mapping every node to a loopback address of its own (127.0.0.2, 127.0.0.3, ...:
hydra would fork locally rather than launch to a host at 127.0.0.1), private /tmp and /dev/shm
as real nodes have, and the caller's `shared` directory at the same path on every node, as a
cluster's shared filesystem. The nodes share the machine's network namespace: all their
traffic stays on 127.0.0.0/8.

PID 1 of each node is tests/programs/simnodes/noded.py, which stands in for Cray PALS's
per-node daemon: it starts commands for simssh, an ssh-like client (tests/programs/simnodes/),
and ends a command's processes when its client goes. popen() and run() go through simssh, and
so does real hydra (mpiexec) given env(): a job runs with real ranks on every node.

Needs root and unshare (namespaces_unavailable() says why not, for pytest.skip). Every wait
has a deadline; a failure says what was observed (the daemon's log, what was left running).
"""

from __future__ import annotations

import contextlib
import functools
import os
import secrets
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import psutil
import pytest

__all__ = ["SIMNODES", "SIMSSH", "SimulatedNodes", "SimNodesError", "namespaces_unavailable",
           "nodes", "wait_for"]

SIMNODES = Path(__file__).parent / "programs" / "simnodes"
REPOSITORY = Path(__file__).resolve().parent.parent
SIMSSH = SIMNODES / "simssh"
_START_TIMEOUT = 60.0  # seconds for a node's daemon to say it is ready, on a loaded machine
_CLOSE_TIMEOUT = 30.0  # seconds for the kernel to empty the namespaces after SIGKILL
_POLL = 0.05  # seconds between looks at something we wait for
_LOG_TAIL = 3000  # characters of a daemon's log put into an error

# MPI between simulated nodes. UCX (MPICH's default netmod from PyPI) decides that two
# processes share a host from the kernel it runs on, not from the hostname, and tries shared
# memory between nodes whose /dev/shm differ: MPI_Init fails ("Destination is unreachable").
# libfabric's tcp provider works, and is the closer stand-in anyway: on Polaris cray-mpich runs
# over libfabric (its cxi provider). Without FI_TCP_IFACE=lo it would take the machine's
# external interface, which tests must not use. (UCX_TLS=tcp,self also works, with UCX.)
MPI_ENV = {"MPIR_CVAR_CH4_NETMOD": "ofi", "FI_PROVIDER": "tcp", "FI_TCP_IFACE": "lo"}

# Where simssh finds the daemons (the names are also in programs/simnodes/simproto.py).
PORT_VARIABLE = "HANGKIT_SIMNODES_PORT"
TOKEN_FILE_VARIABLE = "HANGKIT_SIMNODES_TOKEN_FILE"
PYTHON_VARIABLE = "HANGKIT_SIMNODES_PYTHON"

T = TypeVar("T")


class SimNodesError(RuntimeError):
    """A simulated node did not start, or did not end, as the harness asked."""


class SimNodesTimeout(subprocess.TimeoutExpired):
    """run() ran past its timeout; the message carries the output so far, and what was left
    running on each node when it was killed."""

    def __init__(self, cmd, timeout: float, output, stderr, left: dict[str, list[str]]):
        super().__init__(cmd, timeout, output, stderr)
        self.left = left

    def __str__(self) -> str:
        return (f"{super().__str__()}\n--- stdout (tail) ---\n{_tail(self.output)}"
                f"\n--- stderr (tail) ---\n{_tail(self.stderr)}\n--- running then ---\n{self.left}")


def _tail(text: str | bytes | None, chars: int = _LOG_TAIL) -> str:
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    return (text or "")[-chars:]


@functools.cache
def namespaces_unavailable() -> str | None:
    """None when nodes can be simulated here; else why not (one line), for pytest.skip."""
    if not sys.platform.startswith("linux"):
        return "simulated nodes need Linux namespaces"
    if os.geteuid() != 0:
        return "simulated nodes need root (unshare, mount)"
    missing = [tool for tool in ("unshare", "mount", "hostname") if shutil.which(tool) is None]
    if missing:
        return f"simulated nodes need {', '.join(missing)}"
    # Root is not always enough (a container without CAP_SYS_ADMIN, seccomp): try a node.
    probe = ["unshare", "--pid", "--uts", "--mount", "--fork", "--mount-proc", "sh", "-c",
             "hostname hkprobe && mount -t tmpfs tmpfs /tmp && test $$ = 1"]
    try:
        done = subprocess.run(probe, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unshare failed: {e}"
    if done.returncode != 0:
        return f"unshare failed ({done.returncode}): {done.stderr.strip()[:200]}"
    return None


def wait_for(what: str, observe: Callable[[], T], done: Callable[[T], bool], *,
             timeout: float) -> T:
    """Polls observe() until done(it) holds, and returns it; AssertionError with the last thing
    observed after `timeout` seconds. For tests: e.g. a node's processes, until empty."""
    deadline = time.monotonic() + timeout
    while not done(seen := observe()):
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:.0f} s; last observed: {seen!r}")
        time.sleep(_POLL)  # ok-sleep: polls, with a deadline
    return seen


def _listeners(addresses: list[str], attempts: int = 20) -> tuple[int, list[socket.socket]]:
    """One listening socket per address, all on the same free port, for the daemons to inherit:
    bound here, so no other process can take the port between choosing and listening."""
    for _ in range(attempts):
        sockets: list[socket.socket] = []
        port = 0  # the first address gets a free port, the others the same one
        try:
            for address in addresses:
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sockets.append(sock)
                sock.bind((address, port))
                sock.listen(64)
                port = sock.getsockname()[1]
            return port, sockets
        except OSError:  # that port is taken on another address: try another
            for sock in sockets:
                sock.close()
    raise SimNodesError(f"no port free on all of {addresses} in {attempts} attempts")


@dataclass
class _Node:
    host: str
    address: str
    launcher: subprocess.Popen  # unshare, in this namespace: the parent of the node's PID 1
    log: Path  # the node's setup and daemon write their stderr here
    init_pid: int | None = None  # the daemon (PID 1 there) as this namespace numbers it
    pid_ns: str | None = None  # readlink of /proc/PID/ns/pid of every process on the node

    def log_tail(self) -> str:
        try:
            return _tail(self.log.read_text(errors="replace"))
        except OSError as e:
            return f"(no log: {e})"


class SimulatedNodes:
    """`count` simulated nodes whose shared filesystem is `shared`; a context manager, whose
    nodes are running once constructed. Node i is hosts[i], at addresses[hosts[i]]."""

    def __init__(self, count: int = 2, *, shared: Path) -> None:
        if not 1 <= count <= 250:
            raise ValueError(f"count must be 1 to 250, not {count}")
        self.shared = Path(shared).resolve()
        self.hosts = [f"hknode{i}" for i in range(count)]
        self.addresses = {host: f"127.0.0.{2 + i}" for i, host in enumerate(self.hosts)}
        # The token, the hosts file, the nodes' logs: where every node sees them. Only root
        # may read it (mkdtemp's mode is 0700), as only root may read a node's ssh key.
        self.state = Path(tempfile.mkdtemp(prefix=".simnodes-", dir=self.shared))
        self.nodefile = self.shared / "nodefile"  # as PBS_NODEFILE on Polaris
        self.nodefile.write_text("".join(f"{host}\n" for host in self.hosts))
        self.token_file = self.state / "token"
        fd = os.open(self.token_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
        hosts_file = self.state / "hosts"
        hosts_file.write_text("127.0.0.1 localhost\n" + "".join(
            f"{address} {host}\n" for host, address in self.addresses.items()))
        self._nodes: list[_Node] = []
        self._closed = False
        self.port, listeners = _listeners(list(self.addresses.values()))
        try:
            for host, sock in zip(self.hosts, listeners):
                self._nodes.append(self._launch(host, sock, hosts_file))
            deadline = time.monotonic() + _START_TIMEOUT
            for node in self._nodes:
                self._wait_ready(node, deadline)
        except BaseException:
            self.close()
            raise
        finally:
            for sock in listeners:  # the daemons have their own copies now
                sock.close()

    def __enter__(self) -> SimulatedNodes:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # --- environments ------------------------------------------------------------------------

    def _client_env(self) -> dict[str, str]:
        """What simssh needs to reach the daemons."""
        return {PORT_VARIABLE: str(self.port), TOKEN_FILE_VARIABLE: str(self.token_file),
                PYTHON_VARIABLE: sys.executable}

    def env(self, **extra: str) -> dict[str, str]:
        """os.environ plus what a multi-node job needs here: hydra's launcher (simssh), the MPI
        netmod settings (MPI_ENV), simssh's variables, PBS_NODEFILE=nodefile; then `extra`."""
        return {**os.environ, "HYDRA_LAUNCHER": "ssh", "HYDRA_LAUNCHER_EXEC": str(SIMSSH),
                **MPI_ENV, **self._client_env(), "PBS_NODEFILE": str(self.nodefile), **extra}

    # --- starting and stopping nodes ---------------------------------------------------------

    def _launch(self, host: str, sock: socket.socket, hosts_file: Path) -> _Node:
        log = self.state / f"{host}.log"
        argv = ["unshare", "--pid", "--uts", "--mount", "--fork", "--mount-proc",
                # unshare ignores SIGTERM; if SIGKILL ends it (conftest.py's cleanup), the
                # kernel kills the node's PID 1, and so the node, with it
                "--kill-child=SIGKILL",
                "bash", str(SIMNODES / "node.sh"), host, str(hosts_file), ":".join(self._kept()),
                sys.executable, str(SIMNODES / "noded.py"),
                "--listen-fd", str(sock.fileno()), "--token-file", str(self.token_file)]
        with open(log, "wb") as log_file:
            # The daemon's environment is what commands get when ssh'd to without one: hydra's
            # proxies, for instance. It carries the test's tag (conftest.py) like any process.
            launcher = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                        stderr=log_file, env=self.env(), cwd="/",
                                        pass_fds=[sock.fileno()])
        return _Node(host, self.addresses[host], launcher, log)

    def _kept(self) -> list[str]:
        """What every node must still see under its own /tmp: the shared directory, and this
        repository, hangkit's and the interpreter running it where they lie under /tmp (a
        checkout in a temporary directory, as CI's may be), each once."""
        import hangkit  # installed from which source tree (an editable install's)

        wanted = [REPOSITORY, Path(hangkit.__file__).parent.parent, Path(sys.prefix),
                  Path(sys.base_prefix), Path(os.path.realpath(sys.executable)).parent.parent]
        kept: list[Path] = []
        for path in (p.resolve() for p in wanted):
            if path.is_relative_to("/tmp") and path != Path("/tmp") and not any(
                    path.is_relative_to(k) for k in kept):
                kept = [k for k in kept if not k.is_relative_to(path)] + [path]
        # The shared directory first, always: the daemons start in it.
        return [str(self.shared)] + [str(k) for k in kept if k != self.shared]

    def _wait_ready(self, node: _Node, deadline: float) -> None:
        """Until the daemon prints "ready" (it listens, the node's mounts are made)."""
        out, pipe = b"", node.launcher.stdout
        while b"ready\n" not in out:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([pipe], [], [], remaining)[0]:
                raise SimNodesError(f"{node.host} not ready in {_START_TIMEOUT:.0f} s (printed"
                                    f" {out!r})\n--- its log ---\n{node.log_tail()}")
            chunk = os.read(pipe.fileno(), 4096)
            if not chunk:
                raise SimNodesError(
                    f"{node.host} ended while starting (exit {node.launcher.poll()}, printed"
                    f" {out!r})\n--- its log ---\n{node.log_tail()}")
            out += chunk
        pipe.close()
        children = psutil.Process(node.launcher.pid).children()
        if len(children) != 1:
            raise SimNodesError(f"{node.host}: unshare has children {children}, not one PID 1")
        node.init_pid = children[0].pid
        node.pid_ns = os.readlink(f"/proc/{node.init_pid}/ns/pid")
        if node.pid_ns == os.readlink("/proc/self/ns/pid"):
            raise SimNodesError(f"{node.host}: its PID 1 is in our own PID namespace")

    def _in_namespace(self, node: _Node) -> list[psutil.Process]:
        """Every live, non-zombie process of the node's PID namespace, its daemon included."""
        found = []
        if node.pid_ns is None:
            return found
        for proc in psutil.process_iter():
            try:
                if (os.readlink(f"/proc/{proc.pid}/ns/pid") == node.pid_ns
                        and proc.status() != psutil.STATUS_ZOMBIE):
                    found.append(proc)
            except (OSError, psutil.Error):  # gone meanwhile
                continue
        return found

    def close(self) -> None:
        """SIGKILL to every node's PID 1, which makes the kernel kill every process of its
        namespace; returns once they are all gone. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for node in self._nodes:
            # Never unshare itself while its child lives: an orphaned PID 1 would be left a
            # zombie wherever this machine's init does not reap (a container's often does not).
            targets = [node.init_pid] if node.init_pid else [
                c.pid for c in _children(node.launcher.pid)] or [node.launcher.pid]
            for pid in targets:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + _CLOSE_TIMEOUT
        for node in self._nodes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                node.launcher.wait(max(0.0, deadline - time.monotonic()))
            if node.launcher.stdout:
                node.launcher.stdout.close()
        left = self._left_in_namespaces()
        while left and time.monotonic() < deadline:
            time.sleep(_POLL)  # ok-sleep: polls the namespaces, with a deadline
            left = self._left_in_namespaces()
        running = [n.host for n in self._nodes if n.launcher.poll() is None]
        if left or running:
            raise SimNodesError(f"nodes not ended {_CLOSE_TIMEOUT:.0f} s after SIGKILL:"
                                f" unshare still running for {running}, processes left {left}")

    def _left_in_namespaces(self) -> dict[str, list[str]]:
        return {node.host: [_describe(p) for p in found] for node in self._nodes
                if (found := self._in_namespace(node))}

    # --- running commands on a node ----------------------------------------------------------

    def popen(self, node: int, argv: list[str], *, env: dict[str, str] | None = None,
              cwd: str | Path | None = None, stdin=None, stdout=None, stderr=None,
              text: bool = False) -> subprocess.Popen:
        """Starts argv (exactly, no shell) on node `node`, through its daemon, via simssh run
        here. Returns the local client: its returncode is the remote one (128+N for a signal),
        and terminate() or kill() of it end the remote command's whole session.

        The command gets `env` (default: env()) plus simssh's variables, and starts in `cwd`
        on the node (default: the shared directory); stdin, stdout and stderr are the client's,
        relayed, as for subprocess.Popen."""
        env = {**(self.env() if env is None else env), **self._client_env()}
        host = self.hosts[node]
        client = [str(SIMSSH), "--exact", "--forward-env",
                  *([f"--cwd={cwd}"] if cwd is not None else []),
                  self.addresses[host], *(str(word) for word in argv)]
        return subprocess.Popen(client, env=env, stdin=stdin, stdout=stdout, stderr=stderr,
                                text=text)

    def run(self, node: int, argv: list[str], *, timeout: float,
            env: dict[str, str] | None = None,
            cwd: str | Path | None = None) -> subprocess.CompletedProcess:
        """popen() and wait, capturing text output (stdin is /dev/null). On timeout the client
        is killed, which ends the command, and SimNodesTimeout says what was running."""
        proc = self.popen(node, argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            left = self.leftovers()
            proc.kill()
            out, err = proc.communicate(timeout=30)
            raise SimNodesTimeout(argv, timeout, out, err, left) from None
        return subprocess.CompletedProcess(argv, proc.returncode, out, err)

    # --- what runs where ---------------------------------------------------------------------

    def processes(self, node: int) -> list[psutil.Process]:
        """Every live, non-zombie process on node `node` but its daemon, as seen from here
        (pids of this namespace): those whose /proc/PID/ns/pid is the node's."""
        init_pid = self._nodes[node].init_pid
        return [p for p in self._in_namespace(self._nodes[node]) if p.pid != init_pid]

    @staticmethod
    def pid_in_node(root_pid: int) -> int:
        """The pid the process `root_pid` (of this namespace) has on its node: the last field of
        NSpid in its /proc/PID/status."""
        for line in Path(f"/proc/{root_pid}/status").read_text().splitlines():
            if line.startswith("NSpid:"):
                return int(line.split()[-1])
        raise SimNodesError(f"no NSpid line in /proc/{root_pid}/status")

    def root_pid(self, node: int, pid_in_node: int) -> int | None:
        """The pid, in this namespace, of the process that node `node` numbers `pid_in_node`;
        None when there is none (or it is a zombie)."""
        for proc in self._in_namespace(self._nodes[node]):
            with contextlib.suppress(OSError, SimNodesError):
                if self.pid_in_node(proc.pid) == pid_in_node:
                    return proc.pid
        return None

    def leftovers(self) -> dict[str, list[str]]:
        """host -> ["pid cmdline", ...] (pids of this namespace) for the nodes where anything
        but the daemon runs; empty when nothing does."""
        found = {}
        for i, host in enumerate(self.hosts):
            if described := [_describe(p) for p in self.processes(i)]:
                found[host] = described
        return found


def _children(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children()
    except psutil.NoSuchProcess:
        return []


def _describe(proc: psutil.Process) -> str:
    try:
        # A process being torn down has no command line any more: its name, then.
        return f"{proc.pid} {' '.join(proc.cmdline())[:300] or f'[{proc.name()}]'}"
    except psutil.Error:
        return f"{proc.pid} (gone)"


@pytest.fixture
def nodes(tmp_path: Path) -> Iterator[SimulatedNodes]:
    """Two simulated nodes sharing tmp_path; closed (every process on them ended) afterwards,
    before conftest.py looks for processes left behind."""
    reason = namespaces_unavailable()
    if reason:
        pytest.skip(reason)
    with SimulatedNodes(2, shared=tmp_path) as simulated:
        yield simulated
