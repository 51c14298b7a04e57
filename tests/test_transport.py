"""The wire: Signer and Verifier by themselves, then a real Monitor over real sockets, with a
hand-driven DEALER and with the real agent in a child process."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import socket
import subprocess
import sys
import time

import pytest
import zmq

from hangkit.monitor.server import Monitor
from hangkit.rankenv import RANK_VARIABLES, SIZE_VARIABLES
from hangkit.records import Beat
from hangkit.transport import PROTOCOL, Dropped, Signer, Verifier, new_key

KEY = new_key()


def sign(key: str, body: bytes) -> list[bytes]:
    """Frames for any body, correctly signed: what only a holder of the key can make."""
    return [PROTOCOL, hmac.new(key.encode(), body, hashlib.sha256).hexdigest().encode(), body]


def beat(rank: int, **fields) -> dict:
    return {"type": "beat", **Beat(pid=4242, host="elsewhere", rank=rank, world_size=4,
                                   step=1, phase="x", calls=1, **fields).to_json()}


def counts(d: Dropped) -> dict[str, int]:
    return {"unsigned": d.unsigned, "forged": d.forged, "replayed": d.replayed,
            "malformed": d.malformed}


# Signer and Verifier


def test_a_signed_message_is_accepted_with_sender_and_seq():
    signer, verifier = Signer(KEY), Verifier(KEY)
    first = verifier.open(signer.frames({"type": "beat", "n": 1}))
    second = verifier.open(signer.frames({"type": "beat", "n": 2}))
    assert first == {"type": "beat", "n": 1, "sender": signer.sender, "seq": 1}
    assert second == {"type": "beat", "n": 2, "sender": signer.sender, "seq": 2}
    assert verifier.dropped == Dropped() and verifier.dropped.total == 0


def test_each_signer_has_its_own_sequence():
    a, b, verifier = Signer(KEY), Signer(KEY), Verifier(KEY)
    assert a.sender != b.sender
    assert verifier.open(a.frames({"n": 1}))["seq"] == 1
    assert verifier.open(b.frames({"n": 1}))["seq"] == 1, "another sender's seq 1 is no replay"
    assert verifier.dropped.total == 0


def tampered_signature() -> list[bytes]:
    frames = Signer(KEY).frames({"type": "beat"})
    return [frames[0], b"0" * len(frames[1]), frames[2]]


def tampered_body() -> list[bytes]:
    frames = Signer(KEY).frames({"type": "beat", "rank": 1})
    return [frames[0], frames[1], frames[2].replace(b'"rank":1', b'"rank":0')]


def other_protocol() -> list[bytes]:
    frames = Signer(KEY).frames({"type": "beat"})
    return [b"hangkit/0", *frames[1:]]


@pytest.mark.parametrize("frames, reason", [
    (tampered_signature(), "forged"),
    (tampered_body(), "forged"),
    (Signer(new_key()).frames({"type": "beat"}), "forged"),  # another session's key
    ([PROTOCOL, b"", b'{"type":"beat","sender":"s","seq":1}'], "unsigned"),
    (other_protocol(), "malformed"),
    (Signer(KEY).frames({"type": "beat"})[1:], "malformed"),  # two frames
    ([*Signer(KEY).frames({"type": "beat"}), b"extra"], "malformed"),
    (sign(KEY, b"{not json"), "malformed"),
    (sign(KEY, b"[1, 2]"), "malformed"),
    (sign(KEY, b'{"type":"beat","seq":1}'), "malformed"),  # no sender
    (sign(KEY, b'{"type":"beat","sender":"s"}'), "malformed"),  # no seq
], ids=["bad-signature", "changed-body", "other-key", "empty-signature", "other-protocol",
        "two-frames", "four-frames", "bad-json", "json-list", "no-sender", "no-seq"])
def test_refused_messages_are_counted_by_reason(frames, reason):
    verifier = Verifier(KEY)
    assert verifier.open(frames) is None
    assert counts(verifier.dropped) == {**counts(Dropped()), reason: 1}
    assert verifier.dropped.total == 1


def test_a_replayed_message_is_dropped_and_counted():
    signer, verifier = Signer(KEY), Verifier(KEY)
    frames = signer.frames({"type": "beat", "rank": 0})
    later = signer.frames({"type": "beat", "rank": 0})
    assert verifier.open(frames) is not None
    assert verifier.open(frames) is None
    assert verifier.open(later) is not None, "the sender's next message still gets through"
    assert verifier.open(frames) is None, "an old message stays refused"
    assert counts(verifier.dropped) == {**counts(Dropped()), "replayed": 2}


def test_a_reused_sequence_number_is_a_replay_even_with_another_body():
    verifier = Verifier(KEY)
    assert verifier.open(Signer(KEY, sender="s").frames({"rank": 0})) is not None
    assert verifier.open(Signer(KEY, sender="s").frames({"rank": 3})) is None
    assert verifier.dropped.replayed == 1


@pytest.mark.parametrize("body", [b'{"sender":"s","seq":"two"}', b'{"sender":["s"],"seq":2}'],
                         ids=["seq-a-string", "sender-a-list"])
def test_a_signed_message_with_odd_sender_or_seq_is_malformed_not_an_exception(body):
    verifier = Verifier(KEY)
    assert verifier.open(sign(KEY, b'{"sender":"s","seq":1}')) is not None
    assert verifier.open(sign(KEY, body)) is None
    assert verifier.dropped.malformed == 1


# A real Monitor over real sockets


def wait_for(condition, what: str, timeout: float = 10.0):
    """Polls condition() until it returns something true; fails with what it last saw."""
    deadline = time.monotonic() + timeout
    while True:
        ok, seen = condition()
        if ok:
            return seen
        if time.monotonic() > deadline:
            pytest.fail(f"waited {timeout} s for {what}; last seen: {seen}")
        time.sleep(0.02)  # ok-sleep: a poll interval, not a wait for something


def tracks(m: Monitor) -> dict[str, dict]:
    with m.lock:
        return {k: {"step": t.beat.step, "phase": t.beat.phase, "pid": t.beat.pid,
                    "finished": t.finished, "gone": t.gone, "error": t.beat.error}
                for k, t in m.collector.tracks.items()}


def test_monitor_binds_localhost_by_default():
    with Monitor() as m:
        assert m.address.startswith("tcp://127.0.0.1:"), m.address
        port = int(m.address.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass  # it really listens there
        assert m.environment() == {"HANGKIT_MONITOR": m.address, "HANGKIT_MONITOR_KEY": m.key}


@pytest.fixture
def dealer():
    ctx = zmq.Context()
    sockets = []

    def connect(address: str) -> zmq.Socket:
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(address)
        sockets.append(sock)
        return sock

    yield connect
    for sock in sockets:
        sock.close(linger=0)
    ctx.term()


def test_monitor_drops_bad_messages_and_takes_only_the_signed_one(dealer):
    with Monitor() as m:
        sock = dealer(m.address)
        good = Signer(m.key, sender="agent-0").frames(beat(0))
        sent = [
            Signer(new_key()).frames(beat(1)),  # forged: another key
            [PROTOCOL, b"", json.dumps({**beat(2), "sender": "x", "seq": 1}).encode()],
            [b"hangkit/0", *Signer(m.key).frames(beat(5))[1:]],  # malformed
            good,
            good,  # replayed as is
            Signer(m.key, sender="agent-0").frames(beat(3)),  # replayed: its seq is used up
        ]
        for frames in sent:
            sock.send_multipart(frames)

        def all_seen():
            seen = counts(m.verifier.dropped)
            return seen["replayed"] == 2, seen

        dropped = wait_for(all_seen, "the monitor to count the bad messages")
        assert dropped == {"unsigned": 1, "forged": 1, "replayed": 2, "malformed": 1}
        assert tracks(m) == {"rank 0": {"step": 1, "phase": "x", "pid": 4242,
                                        "finished": False, "gone": False, "error": None}}
        with m.lock:
            assert m.collector.beats == 1, "the replayed copy was not ingested"


def test_monitor_outlives_a_signed_beat_with_a_bad_field(dealer):
    with Monitor() as m:
        sock = dealer(m.address)
        sock.send_multipart(Signer(m.key).frames({**beat(1), "since_progress": "soon"}))
        sock.send_multipart(Signer(m.key).frames(beat(0)))
        wait_for(lambda: ("rank 0" in (seen := tracks(m)), seen),
                 "the beat after the odd one to be taken", timeout=3)


def child_env(m_env: dict[str, str], **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in RANK_VARIABLES + SIZE_VARIABLES}
    return {**env, **m_env, **extra}


REPORT_THEN_BLOCK = """\
import sys
import hangkit.agent
hangkit.agent.progress(step=1, phase="x")
sys.stdin.read()
"""


def test_the_real_agent_reports_and_says_bye_at_exit():
    with Monitor() as m:
        proc = subprocess.Popen([sys.executable, "-c", REPORT_THEN_BLOCK],
                                env=child_env(m.environment(), RANK="0"),
                                stdin=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            def reported():
                seen = tracks(m)
                rank = seen.get("rank 0")
                return rank is not None and (rank["step"], rank["phase"]) == (1, "x"), seen

            seen = wait_for(reported, "the agent's beat with step 1 in phase 'x'")
            assert seen["rank 0"]["pid"] == proc.pid
            assert not seen["rank 0"]["finished"]
            proc.stdin.close()
            proc.wait(timeout=10)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == 0, proc.stderr.read().decode()
        proc.stderr.close()
        # The monitor notices a vanished local process within a second or so, as "gone": only
        # the goodbye makes it "finished".
        seen = wait_for(lambda: ((t := tracks(m)["rank 0"])["finished"] or t["gone"], t),
                        "the rank's track to end")
        assert seen["finished"] and not seen["gone"], f"no goodbye arrived: {seen}"


LOOP_AND_EXIT = """\
import time
import hangkit.agent
start = time.monotonic()
for i in range(100000):
    hangkit.agent.progress(step=i)
print(time.monotonic() - start, hangkit.agent.current_agent() is not None)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def closed_monitor() -> dict[str, str]:
    m = Monitor()
    m.close()
    return m.environment()


def nothing_listening() -> dict[str, str]:
    return {"HANGKIT_MONITOR": f"tcp://127.0.0.1:{free_port()}",
            "HANGKIT_MONITOR_KEY": new_key()}


@pytest.mark.parametrize("where", [closed_monitor, nothing_listening],
                         ids=["closed-monitor", "nothing-listening"])
def test_a_missing_monitor_never_blocks_a_rank(where):
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-c", LOOP_AND_EXIT], capture_output=True, text=True,
                          env=child_env(where(), RANK="0"), timeout=30)
    took = time.monotonic() - start
    assert done.returncode == 0, done.stderr
    elapsed, started = done.stdout.split()
    assert started == "True", "the agent started, so the test measures it"
    assert float(elapsed) < 5, f"100000 progress() calls took {elapsed} s"
    assert took < 20, f"the rank took {took:.1f} s to run and exit"
