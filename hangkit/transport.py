"""The wire between rank agents and the monitor: signed JSON over ZeroMQ.

Messages are JSON (never pickle: a message is data, not code) signed with HMAC-SHA256 under a
random per-session key, as Jupyter signs its messages. Every message carries its sender's id and
a sequence number that only grows, so a replayed message is recognised and dropped. The key and
the monitor's address reach ranks through the environment (MONITOR_ADDRESS, MONITOR_KEY).

Frames of one message: [PROTOCOL, hex signature of body, body]. This module imports only the
stdlib: the agent imports zmq itself, lazily.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import json
import os
import secrets
from collections import OrderedDict
from dataclasses import dataclass, field

PROTOCOL = b"hangkit/1"
MONITOR_ADDRESS = "HANGKIT_MONITOR"
MONITOR_KEY = "HANGKIT_MONITOR_KEY"
# Replay protection remembers this many senders; the oldest is forgotten first.
MAX_SENDERS = 65536


def new_key() -> str:
    return secrets.token_hex(32)


def sender_id() -> str:
    return secrets.token_hex(8)


class Signer:
    """Encodes and signs one sender's messages; each gets the next sequence number."""

    def __init__(self, key: str, sender: str | None = None):
        self._key = key.encode()
        self.sender = sender or sender_id()
        self._seq = itertools.count(1)

    def frames(self, message: dict) -> list[bytes]:
        # default=str: a value JSON cannot carry is sent as its text, never stops the beats.
        body = json.dumps({**message, "sender": self.sender, "seq": next(self._seq)},
                          separators=(",", ":"), default=str).encode()
        return [PROTOCOL, hmac.new(self._key, body, hashlib.sha256).hexdigest().encode(), body]


@dataclass
class Dropped:
    """Messages refused, by reason. A count above zero is worth telling the user about."""

    unsigned: int = 0
    forged: int = 0
    replayed: int = 0
    malformed: int = 0

    @property
    def total(self) -> int:
        return self.unsigned + self.forged + self.replayed + self.malformed


@dataclass
class Verifier:
    """Checks signatures and sequence numbers; returns the message, or None and counts why."""

    key: str
    dropped: Dropped = field(default_factory=Dropped)
    _last_seq: OrderedDict = field(default_factory=OrderedDict)

    def __post_init__(self):
        self._key = self.key.encode()

    def open(self, frames: list[bytes]) -> dict | None:
        if len(frames) != 3 or frames[0] != PROTOCOL:
            self.dropped.malformed += 1
            return None
        _, signature, body = frames
        if not signature:
            self.dropped.unsigned += 1
            return None
        expected = hmac.new(self._key, body, hashlib.sha256).hexdigest().encode()
        if not hmac.compare_digest(signature, expected):
            self.dropped.forged += 1
            return None
        try:
            message = json.loads(body)
            sender, seq = message["sender"], message["seq"]
        except (ValueError, TypeError, KeyError):
            self.dropped.malformed += 1
            return None
        if not isinstance(sender, str) or type(seq) is not int:
            self.dropped.malformed += 1
            return None
        last = self._last_seq.get(sender)
        if last is not None and seq <= last:
            self.dropped.replayed += 1
            return None
        self._last_seq[sender] = seq
        self._last_seq.move_to_end(sender)
        if len(self._last_seq) > MAX_SENDERS:
            self._last_seq.popitem(last=False)
        return message


def monitor_from_environ(environ=os.environ) -> tuple[str, str] | None:
    """(address, key) when this process was started under a monitor, else None."""
    address, key = environ.get(MONITOR_ADDRESS), environ.get(MONITOR_KEY)
    return (address, key) if address and key else None
