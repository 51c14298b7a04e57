"""The simulated-nodes harness itself (tests/simnodes.py): nodes are apart where real nodes are
(hostname, /tmp, /dev/shm, processes) and together where they are (names, the shared
directory); real hydra, MPI and torch gloo run across them; nothing outlives a node."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import psutil
import pytest
import simnodes
from simnodes import SIMNODES, SIMSSH, SimulatedNodes, wait_for

nodes = simnodes.nodes  # the fixture

MPIEXEC = Path(sys.executable).with_name("mpiexec")
# A sleep nothing else on this machine runs: the workload whose visibility is checked.
SLEEP = ["sleep", "3517"]


def sleeps(simulated: SimulatedNodes, node: int) -> list[psutil.Process]:
    found = []
    for proc in simulated.processes(node):
        try:
            if proc.cmdline() == SLEEP:
                found.append(proc)
        except psutil.Error:
            continue
    return found


def one_sleep(simulated: SimulatedNodes, node: int) -> psutil.Process:
    (proc,) = wait_for(f"one {' '.join(SLEEP)} on node {node}", lambda: sleeps(simulated, node),
                       lambda found: len(found) == 1, timeout=60)
    return proc


def empty(simulated: SimulatedNodes, node: int) -> None:
    wait_for(f"node {node} empty", lambda: simulated.leftovers(),
             lambda left: simulated.hosts[node] not in left, timeout=60)


def checked(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done.stdout


def job_lines(simulated: SimulatedNodes, program: str, **env: str) -> list[list[str]]:
    """`mpiexec -n 4 -ppn 2` of a program of programs/simnodes, launched on node 0: its lines
    of output, split into words, sorted by rank."""
    if not MPIEXEC.exists():
        pytest.skip("mpiexec not installed (the local-mpi extra)")
    done = simulated.run(0, [str(MPIEXEC), "-n", "4", "-ppn", "2", "--hostfile",
                             str(simulated.nodefile), sys.executable, str(SIMNODES / program)],
                         env=simulated.env(**env), timeout=240)
    lines = sorted((line.split() for line in checked(done).splitlines()), key=lambda w: int(w[0]))
    assert [words[0] for words in lines] == ["0", "1", "2", "3"], done.stdout
    return lines


@pytest.mark.timeout(120)
def test_nodes_are_apart_and_share_one_directory(nodes, tmp_path):
    assert [checked(nodes.run(i, ["hostname"], timeout=60)) for i in (0, 1)] == [
        "hknode0\n", "hknode1\n"]
    for i in (0, 1):
        resolved = checked(nodes.run(i, ["getent", "hosts", "hknode0", "hknode1"], timeout=60))
        assert resolved.split() == ["127.0.0.2", "hknode0", "127.0.0.3", "hknode1"], i

    name = f"simnodes-{uuid.uuid4().hex}"
    checked(nodes.run(1, ["sh", "-c", f"echo one > /tmp/{name} && echo one > /dev/shm/{name}"],
                      timeout=60))
    assert checked(nodes.run(1, ["cat", f"/tmp/{name}", f"/dev/shm/{name}"], timeout=60)) == (
        "one\none\n")
    on_node0 = nodes.run(0, ["ls", f"/tmp/{name}", f"/dev/shm/{name}"], timeout=60)
    assert on_node0.returncode != 0, on_node0.stdout
    assert not Path("/tmp", name).exists() and not Path("/dev/shm", name).exists()

    checked(nodes.run(1, ["sh", "-c", f"echo from-node1 > {tmp_path}/shared"], timeout=60))
    (tmp_path / "from-here").write_text("from here\n")
    for i in (0, 1):
        assert checked(nodes.run(i, ["cat", "shared", "from-here"], cwd=tmp_path, timeout=60)) == (
            "from-node1\nfrom here\n")
    assert (tmp_path / "shared").read_text() == "from-node1\n"


# What node 0 sees of a pid: its /proc entry, the sleep among its processes, kill -0 on it.
LOOK = """
import json, os, sys
pid = int(sys.argv[1])
def cmdline(p):
    try:
        with open(f"/proc/{p}/cmdline", "rb") as f:
            return f.read().split(b"\\0")[:-1]
    except OSError:
        return None
try:
    os.kill(pid, 0)
    kill = "delivered"
except OSError as e:
    kill = e.strerror
sleeps = [p for p in os.listdir("/proc") if p.isdigit() and cmdline(p) == [b"sleep", b"3517"]]
print(json.dumps({"kill": kill, "cmdline": [w.decode() for w in cmdline(pid) or []],
                  "sleeps": sleeps}))
"""


@pytest.mark.timeout(120)
def test_a_process_on_node1_is_invisible_from_node0(nodes):
    client = nodes.popen(1, SLEEP, stdin=subprocess.DEVNULL)
    try:
        pid = nodes.pid_in_node(one_sleep(nodes, 1).pid)
        # On its own node the pid is that sleep: the look below can see what it looks for.
        mine = json.loads(checked(nodes.run(1, [sys.executable, "-c", LOOK, str(pid)], timeout=60)))
        assert mine == {"kill": "delivered", "cmdline": SLEEP, "sleeps": [str(pid)]}
        seen = json.loads(checked(nodes.run(0, [sys.executable, "-c", LOOK, str(pid)], timeout=60)))
        assert seen["sleeps"] == [], seen
        # kill -0 finds no such process there, or another one (pids are per node)
        assert seen["kill"] != "delivered" or seen["cmdline"] != SLEEP, seen
    finally:
        client.kill()
        client.wait(60)
    empty(nodes, 1)


@pytest.mark.timeout(180)
def test_real_hydra_mpi_job_across_nodes(nodes):
    lines = job_lines(nodes, "mpi_allreduce.py")
    assert lines == [["0", "hknode0", "10"], ["1", "hknode0", "10"],
                     ["2", "hknode1", "10"], ["3", "hknode1", "10"]]
    empty(nodes, 0)
    empty(nodes, 1)


@pytest.mark.timeout(300)
def test_torch_gloo_across_nodes(nodes):
    with socket.socket() as probe:  # a port free now, for the rendezvous on hknode0
        probe.bind((nodes.addresses["hknode0"], 0))
        port = probe.getsockname()[1]
    lines = job_lines(nodes, "gloo_allreduce.py", MASTER_ADDR="hknode0", MASTER_PORT=str(port))
    assert lines == [["0", "hknode0", "127.0.0.2", "10"], ["1", "hknode0", "127.0.0.2", "10"],
                     ["2", "hknode1", "127.0.0.3", "10"], ["3", "hknode1", "127.0.0.3", "10"]]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("how, argv", [
    ("terminate", SLEEP),
    # a session that ignores SIGTERM: the daemon's SIGKILL after its grace ends it
    ("kill", ["sh", "-c", f"trap '' TERM; {' '.join(SLEEP)}; echo not reached"]),
])
def test_killing_the_client_ends_the_remote_command(nodes, how, argv):
    client = nodes.popen(1, argv, stdin=subprocess.DEVNULL)
    one_sleep(nodes, 1)
    getattr(client, how)()
    assert client.wait(60) < 0
    empty(nodes, 1)


@pytest.mark.timeout(120)
def test_ssh_style_call_from_node0_as_hydra_makes_it(nodes):
    # Words joined for sh -c, HOST resolved by node 0's /etc/hosts, stdin relayed, exit status
    done = nodes.popen(0, [str(SIMSSH), "-x", "-o", "BatchMode=yes", "hknode1",
                           "read line;", "echo", "$line", "$(hostname);", "exit", "7"],
                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = done.communicate(b"hello\n", timeout=60)
    assert (done.returncode, out) == (7, b"hello hknode1\n"), err
    # a command killed by signal N: 128+N, as ssh exits
    killed = nodes.run(0, [str(SIMSSH), "hknode1", "kill -TERM $$"], timeout=60)
    assert killed.returncode == 128 + 15, killed.stderr


@pytest.mark.timeout(120)
def test_a_daemon_refuses_a_request_without_its_token(nodes, tmp_path):
    wrong = tmp_path / "wrong-token"
    wrong.write_text("0" * 64)
    marker = tmp_path / "ran"
    done = subprocess.run([str(SIMSSH), nodes.addresses["hknode1"], "touch", str(marker)],
                          env=nodes.env(HANGKIT_SIMNODES_TOKEN_FILE=str(wrong)),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 255 and "refused" in done.stderr, done.stderr
    assert not marker.exists()


@pytest.mark.timeout(120)
def test_orphans_are_reaped(nodes):
    # sh leaves its sleep behind; the daemon, PID 1, inherits it, and must reap it once ended
    checked(nodes.run(1, ["sh", "-c", f"{' '.join(SLEEP)} >/dev/null 2>&1 &"], timeout=60))
    orphan = one_sleep(nodes, 1)
    assert nodes.pid_in_node(orphan.ppid()) == 1
    assert nodes.root_pid(1, nodes.pid_in_node(orphan.pid)) == orphan.pid
    orphan.terminate()
    wait_for(f"{orphan.pid} reaped (no zombie left)", lambda: psutil.pid_exists(orphan.pid),
             lambda exists: not exists, timeout=60)


@pytest.mark.timeout(120)
def test_leftovers_are_reported_and_close_ends_them(nodes):
    assert nodes.leftovers() == {}
    checked(nodes.run(1, ["sh", "-c", f"setsid {' '.join(SLEEP)} >/dev/null 2>&1 &"],
                      timeout=60))
    orphan = one_sleep(nodes, 1)
    assert nodes.leftovers() == {"hknode1": [f"{orphan.pid} {' '.join(SLEEP)}"]}
    daemons = [psutil.Process(nodes.root_pid(i, 1)) for i in (0, 1)]
    nodes.close()
    nodes.close()  # idempotent
    # is_running() is true of a zombie too: all must be reaped
    running = [p for p in (orphan, *daemons) if p.is_running()]
    assert running == [] and nodes.leftovers() == {}, running
