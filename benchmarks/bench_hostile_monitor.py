"""Benchmark of the monitor against hostile peers (issue 24, "bounded before verified"): what a
peer that holds no key can make it spend. Each figure is printed with its ratio to its goal.

1. Memory under 1 GiB messages. A Monitor in its own process (as under `hangkit watch`), a
   real agent beating to it; then three raw ZMTP senders at once, each announcing a 1 GiB frame
   and pushing it, from this user (who passes the gate: MAX_MESSAGE_BYTES cuts them). Where
   this runs as root with useradd and setpriv: another local user's attack too (1,200 idle
   connections, a 1 GiB frame, an endless multipart message of 256 MiB; the gate refuses it).
   Figure: the monitor's peak RSS above its baseline, and its peak descriptors. Goal: < 100 MB.
2. CPU under 10,000 invalid messages a second for CPU_SECONDS, from a peer that passes the gate
   but holds no key (forged signatures), while the real agent beats. Figure: the monitor's CPU,
   in % of a core, beside its CPU with the agent alone. Goals: < 20 % of a core; no verdict
   (dead, stalled, ...) about the real rank.
3. CurveZMQ per beat: a signed beat (and a 100 KB batch) over tcp on loopback, NULL against
   CURVE, sender and receiver in one process; and a connection's handshake. Figure: what CURVE
   adds, in microseconds of CPU a message. Goal: < 20 us a beat (2 % of a core at 1,000
   beats a second; the monitor takes one batch a node a second).

Run from the repository root:  .venv/bin/python benchmarks/bench_hostile_monitor.py
About a minute. Always exits 0; a missed goal is printed as MISSED. Every process started here
is ended before the script ends (checked afterwards by an environment marker).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import zmq
from benchrun import (
    MARKER,
    MARKER_VALUE,
    end_all,
    job_env,
    judged,
    kill_marked,
    load_line,
    measure_all,
    print_summary,
)

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from test_hostile_peers import (  # noqa: E402
    AGENT,
    ATTACK,
    SAME_USER_OVERSIZED,
    second_user,
    second_user_missing,
)

from hangkit.transport import (  # noqa: E402
    HANDSHAKE_SECONDS,
    MAX_MESSAGE_BYTES,
    Signer,
    curve_keys,
    new_key,
)

MIB = 1 << 20
RSS_GOAL = 100 * MIB
CPU_GOAL = 20.0  # % of a core
CPU_SECONDS = 10.0
INVALID_RATE = 10_000  # messages a second
CURVE_GOAL_US = 20.0
BEATS = 20_000
BATCHES = 500
HANDSHAKES = 200

# The monitor under test, as under `hangkit watch`: detection runs as watch runs it. Each line
# on its stdin asks for its stats (and the verdicts so far); EOF ends it.
MONITOR = r"""
import json, sys, threading
from hangkit.monitor.server import Monitor
from hangkit.monitor.stall import StallConfig
m = Monitor(bind="127.0.0.1", config=StallConfig(stall_after=15.0))
print(json.dumps({"address": m.address, "key": m.key}), flush=True)
events, stop = [], threading.Event()
def detect():
    while not stop.wait(0.1):
        events.extend(f"{e.kind}: {e.summary}" for e in m.detect())
threading.Thread(target=detect, daemon=True).start()
for _ in sys.stdin:
    ranks = [s for s in m.statuses() if s.key == "rank 0"]
    print(json.dumps({**m.stats(), "events": events, "rank0": ranks[0].to_json() if ranks
                      else None}), flush=True)
stop.set()
m.close()
"""


class Watched:
    """A monitor process and a real agent beating to it."""

    def __init__(self):
        self.monitor = subprocess.Popen([sys.executable, "-c", MONITOR], env=job_env(),
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        hello = json.loads(self.monitor.stdout.readline())
        self.address, self.key = hello["address"], hello["key"]
        self.port = int(self.address.rsplit(":", 1)[1])
        self.proc = psutil.Process(self.monitor.pid)
        self.agent = subprocess.Popen(
            [sys.executable, "-c", AGENT], stdin=subprocess.PIPE, stderr=subprocess.DEVNULL,
            env=job_env(HANGKIT_MONITOR=self.address, HANGKIT_MONITOR_KEY=self.key, RANK="0",
                        WORLD_SIZE="1"))
        deadline = time.monotonic() + 120
        while not ((r := self.stats()["rank0"]) and r["beat_age"] < 2.0 and r["step"]):
            if time.monotonic() > deadline:
                raise TimeoutError("the agent's beats did not arrive")
            time.sleep(0.1)  # ok-sleep: a poll interval

    def stats(self) -> dict:
        self.monitor.stdin.write("\n")
        self.monitor.stdin.flush()
        return json.loads(self.monitor.stdout.readline())

    def rss(self) -> int:
        return self.proc.memory_info().rss

    def close(self) -> None:
        for p in (self.agent, self.monitor):
            with contextlib.suppress(OSError):
                p.stdin.close()
        end_all(self.agent, self.monitor)


class Peak(threading.Thread):
    """The monitor's RSS and descriptors, sampled every 20 ms until stopped."""

    def __init__(self, proc: psutil.Process):
        super().__init__(daemon=True)
        self.proc, self.rss, self.fds, self.done = proc, 0, 0, threading.Event()
        self.start()

    def run(self) -> None:
        while not self.done.wait(0.02):
            with contextlib.suppress(psutil.Error):
                self.rss = max(self.rss, self.proc.memory_info().rss)
                self.fds = max(self.fds, self.proc.num_fds())

    def stop(self) -> Peak:
        self.done.set()
        self.join(5)
        return self


def verdicts(events: list[str]) -> list[str]:
    return [e for e in events if e.split(":")[0] in ("dead", "stall", "stopped", "unheard")]


def figure_memory(workdir) -> list:
    w = Watched()
    try:
        time.sleep(1.0)  # ok-sleep: a settled baseline, beats included
        base_rss, base_fds = w.rss(), w.proc.num_fds()
        peak = Peak(w.proc)
        senders = [subprocess.Popen([sys.executable, "-c", SAME_USER_OVERSIZED, str(w.port)],
                                    stdout=subprocess.PIPE, text=True, env=job_env())
                   for _ in range(3)]
        sent = [int(p.communicate(timeout=120)[0] or 0) for p in senders]
        peak.stop()
        grown = peak.rss - base_rss
        lines = [judged("monitor RSS above baseline, three 1 GiB frames at once from this user",
                        f"{grown / MIB:.1f} MiB (base {base_rss / MIB:.0f} MiB; each sender got "
                        f"{max(sent) / MIB:.1f} MiB in before the cut)",
                        "< 100 MB", grown / RSS_GOAL, grown < RSS_GOAL)]
        why = second_user_missing()
        if why:
            lines.append((None, f"another user's attack: not measured ({why})"))
        else:
            with second_user() as (uid, gid, python):
                peak = Peak(w.proc)
                attacker = subprocess.Popen(
                    ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", python,
                     "-c", ATTACK, str(w.port), "1200", str(256 * MIB)], cwd="/",
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                    env={**os.environ, MARKER: MARKER_VALUE})
                try:
                    stages = {}
                    for _ in range(3):
                        stage = json.loads(attacker.stdout.readline())
                        stages[stage.pop("stage")] = stage
                    time.sleep(1.0)  # ok-sleep: the attacker holds everything for a while
                    stats = w.stats()
                finally:
                    with contextlib.suppress(OSError):
                        attacker.stdin.close()
                    end_all(attacker)
                peak.stop()
                grown = peak.rss - base_rss
                lines.append(judged(
                    "monitor RSS above baseline, another user's flood",
                    f"{grown / MIB:.1f} MiB, descriptors at most {peak.fds - base_fds:+d} "
                    f"(attacker: {stages['flood']['opened']} connections opened, "
                    f"{stages['oversized']['sent'] / MIB:.1f} MiB of a 1 GiB frame and "
                    f"{stages['endless']['sent'] / MIB:.1f} MiB of an endless message pushed "
                    "before the cut; "
                    f"{stats['refused_peers']} connections refused; verdicts "
                    f"{verdicts(stats['events']) or 'none'})",
                    "< 100 MB", grown / RSS_GOAL, grown < RSS_GOAL))
        return lines
    finally:
        w.close()


def cpu_over(proc: psutil.Process, seconds: float, during=None) -> float:
    """The process's CPU in % of a core over `seconds`, while during() runs (if given)."""
    before, start = proc.cpu_times(), time.monotonic()
    if during is None:
        time.sleep(seconds)  # ok-sleep: the measuring window
    else:
        during(seconds)
    after, wall = proc.cpu_times(), time.monotonic() - start
    return 100.0 * (after.user + after.system - before.user - before.system) / wall


def flood_invalid(address: str, seconds: float) -> int:
    """INVALID_RATE forged messages a second (well-formed frames, a signature under another
    key) from a DEALER, paced in slices of 10 ms."""
    forger = Signer(new_key())
    message = forger.frames({"type": "beat", "pid": 1, "host": "x", "rank": 9, "step": 1})
    sent = 0
    with zmq.Context() as ctx, ctx.socket(zmq.DEALER) as sock:
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 100_000)
        sock.connect(address)
        start = time.monotonic()
        while (now := time.monotonic()) < start + seconds:
            due = int((now - start) * INVALID_RATE)
            while sent < due:
                with contextlib.suppress(zmq.Again):
                    sock.send_multipart(message, zmq.NOBLOCK)
                sent += 1
            time.sleep(0.01)  # ok-sleep: pacing
    return sent


def figure_cpu(workdir) -> list:
    w = Watched()
    try:
        idle = cpu_over(w.proc, CPU_SECONDS / 2)
        sent = []
        busy = cpu_over(w.proc, CPU_SECONDS,
                        lambda s: sent.append(flood_invalid(w.address, s)))
        stats = w.stats()
        forged = stats["dropped"]["forged"]
        bad = verdicts(stats["events"])
        rank0 = stats["rank0"] or {}
        return [
            judged("monitor CPU under 10,000 invalid messages a second",
                   f"{busy:.1f} % of a core ({sent[0] / CPU_SECONDS:.0f} sent a second, "
                   f"{forged} counted as forged; {idle:.1f} % with the agent alone)",
                   f"< {CPU_GOAL:.0f} % of a core", busy / CPU_GOAL, busy < CPU_GOAL),
            judged("verdicts about the real rank during the flood",
                   f"{len(bad)} ({'; '.join(bad) or 'none'}; its status {rank0.get('status')}, "
                   f"last beat {rank0.get('beat_age', float('nan')):.1f} s old)",
                   "0", float(len(bad)), not bad),
        ]
    finally:
        w.close()


def per_message(curve: bool, frames: list[bytes], count: int) -> float:
    """CPU microseconds (this process: both ends) per message of `frames`, DEALER to ROUTER
    over tcp on loopback."""
    key = new_key()
    with zmq.Context() as ctx:
        router, dealer = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
        try:
            for s in (router, dealer):
                s.setsockopt(zmq.LINGER, 0)
                s.setsockopt(zmq.SNDHWM, 0)
                s.setsockopt(zmq.RCVHWM, 0)
            if curve:
                server_public, server_secret, public, secret = curve_keys(key)
                router.curve_server, router.curve_secretkey = 1, server_secret
                dealer.curve_serverkey, dealer.curve_publickey, dealer.curve_secretkey = (
                    server_public, public, secret)
            port = router.bind_to_random_port("tcp://127.0.0.1")
            dealer.connect(f"tcp://127.0.0.1:{port}")
            dealer.send_multipart(frames)
            router.recv_multipart()  # connected, handshake done
            started = time.process_time()
            for _ in range(count):
                dealer.send_multipart(frames)
            for _ in range(count):
                router.recv_multipart()
            return (time.process_time() - started) / count * 1e6
        finally:
            router.close(0)
            dealer.close(0)


def handshake_ms(curve: bool) -> float:
    """Wall milliseconds from connect to the first message received, per connection."""
    key = new_key()
    with zmq.Context() as ctx:
        router = ctx.socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 0)
        if curve:
            server_public, server_secret, public, secret = curve_keys(key)
            router.curve_server, router.curve_secretkey = 1, server_secret
        port = router.bind_to_random_port("tcp://127.0.0.1")
        started = time.monotonic()
        for _ in range(HANDSHAKES):
            dealer = ctx.socket(zmq.DEALER)
            dealer.setsockopt(zmq.LINGER, 0)
            if curve:
                dealer.curve_serverkey, dealer.curve_publickey, dealer.curve_secretkey = (
                    server_public, public, secret)
            dealer.connect(f"tcp://127.0.0.1:{port}")
            dealer.send(b"x")
            router.recv_multipart()
            dealer.close(0)
        elapsed = time.monotonic() - started
        router.close(0)
        return elapsed / HANDSHAKES * 1e3


def figure_curve(workdir) -> list:
    signer = Signer(new_key())
    beat = signer.frames({"type": "beat", "pid": 12345, "host": "x3004c0s7b0n0", "rank": 1234,
                          "world_size": 2240, "step": 100, "phase": "train", "calls": 600,
                          "since_progress": 0.1, "phase_seconds": 0.3, "collective_seconds": 1.2,
                          "collective": {"library": "c10d", "comm": "0", "op": "allreduce",
                                         "seq": 99, "inside": False, "seconds": 0.0},
                          "fields": {}, "workers": [], "extra": {}, "sent_at": time.time()})
    batch = signer.frames({"type": "batch", "rows": ["x" * 100] * 1000})
    null_beat, curve_beat = per_message(False, beat, BEATS), per_message(True, beat, BEATS)
    null_batch = per_message(False, batch, BATCHES)
    curve_batch = per_message(True, batch, BATCHES)
    null_hs, curve_hs = handshake_ms(False), handshake_ms(True)
    added = curve_beat - null_beat
    size = sum(map(len, beat))
    return [
        judged("CPU CurveZMQ adds per beat (both ends)",
               f"{added:.1f} us ({null_beat:.1f} us NULL, {curve_beat:.1f} us CURVE, a "
               f"{size} B beat)", f"< {CURVE_GOAL_US:.0f} us", added / CURVE_GOAL_US,
               added < CURVE_GOAL_US),
        (None, f"a 100 KB batch: {null_batch:.0f} us NULL, {curve_batch:.0f} us CURVE; "
               f"a connection's handshake: {null_hs:.2f} ms NULL, {curve_hs:.2f} ms CURVE"),
    ]


def main() -> int:
    started = time.monotonic()
    print(load_line())
    print(f"MAX_MESSAGE_BYTES {MAX_MESSAGE_BYTES >> 20} MiB, HANDSHAKE_SECONDS "
          f"{HANDSHAKE_SECONDS:g}; CurveZMQ beyond loopback, the kernel's word on users on it")
    figures = [
        ("1. memory under 1 GiB messages", figure_memory),
        ("2. CPU under 10,000 invalid messages a second", figure_cpu),
        ("3. what CurveZMQ costs a beat", figure_curve),
    ]
    with tempfile.TemporaryDirectory(prefix="hk-bench-hostile-") as tmp:
        results = measure_all(figures, Path(tmp), end=kill_marked)
    print_summary(results, started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
