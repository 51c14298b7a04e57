"""The wire between rank agents and the monitor: signed JSON over ZeroMQ.

Messages are JSON (never pickle: a message is data, not code) signed with HMAC-SHA256 under a
random per-session key, as Jupyter signs its messages. Every message carries its sender's id and
a sequence number that only grows, so a replayed message is recognised and dropped. The key and
the monitor's address reach ranks through the environment (MONITOR_ADDRESS, MONITOR_KEY).

Frames of one message: [PROTOCOL, hex signature of body, body]. This module imports only the
stdlib: the agent imports zmq itself, lazily (and so do the functions here that set a zmq
socket's options).

Bounded before verified: a signature is checked only once a whole message is in memory, so what
a peer may send before that is bounded by the transport. Every socket hangkit listens on refuses
a frame over MAX_MESSAGE_BYTES (ZeroMQ drops the peer on reading the frame's size, before
allocating it). Who may reach the monitor at all depends on its address (curve_for): on
loopback, processes of this user (or root) on this host, told apart by the kernel before their
handshake completes (peer_uid); anywhere else, holders of the run's key, authenticated by
CurveZMQ with keys derived from it (curve_keys), so that no other peer's frame is ever read.
docs/security.md says what each socket accepts and from whom.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import json
import os
import secrets
import socket
import struct
from collections import OrderedDict
from dataclasses import dataclass, field

PROTOCOL = b"hangkit/1"
MONITOR_ADDRESS = "HANGKIT_MONITOR"
MONITOR_KEY = "HANGKIT_MONITOR_KEY"
# Replay protection remembers this many senders; the oldest is forgotten first.
MAX_SENDERS = 65536
# The largest frame a hangkit socket takes; a peer that sends more is disconnected. The largest
# legitimate one is a relay's reply to a capture: every rank of its node with its stacks and
# Flight Recorder dump. A dump is at most torch's 2,000 entries (KEEP_ENTRIES a group), ~4 KB
# each with stack traces: ~8 MB a rank, ~100 MB for a 12-rank node (~700 B an entry without
# traces: ~17 MB). A batch of 1,000 ranks' beats is under 1 MB. Far below a GiB: what an
# unbounded peer made watch allocate (issue 24).
MAX_MESSAGE_BYTES = 128 << 20
# A connection that has not completed its handshake (CURVE's, or the kernel's word on its
# user) by then is dropped by ZeroMQ: idle peers do not keep a descriptor each for long.
HANDSHAKE_SECONDS = 10.0
ZAP_DOMAIN = b"hangkit"
_LOOPBACK = ("localhost", "::1")


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


def curve_for(address: str) -> bool:
    """Whether the wire to the monitor at `address` is CurveZMQ: a tcp:// address that is not
    loopback's. Both ends decide from the address alone, the one thing every rank is given."""
    if not address.startswith("tcp://"):
        return False  # ipc:// (a node's relay) is guarded by its file's mode, 0600
    host = address[len("tcp://"):].rpartition(":")[0].strip("[]")
    return not (host in _LOOPBACK or host.startswith("127."))


def curve_keys(key: str) -> tuple[bytes, bytes, bytes, bytes]:
    """(server public, server secret, client public, client secret), Z85-encoded, derived from
    the run's key: whoever holds the key can connect, nobody else can even be read. Needs a
    libzmq with CURVE (every pyzmq wheel has it)."""
    import zmq
    from zmq.utils import z85

    def secret(role: bytes) -> bytes:
        return z85.encode(hmac.new(key.encode(), b"hangkit curve " + role,
                                   hashlib.sha256).digest())

    server, client = secret(b"server"), secret(b"client")
    return zmq.curve_public(server), server, zmq.curve_public(client), client


def secure_client(sock, address: str, key: str) -> None:
    """What a zmq socket about to connect to the monitor at `address` needs: CurveZMQ keys
    where curve_for says so. Raises zmq.ZMQError where this libzmq has no CURVE."""
    if curve_for(address):
        import zmq

        server_public, _, public, secret = curve_keys(key)
        sock.setsockopt(zmq.CURVE_SERVERKEY, server_public)
        sock.setsockopt(zmq.CURVE_PUBLICKEY, public)
        sock.setsockopt(zmq.CURVE_SECRETKEY, secret)


# The kernel's socket diagnostics (linux/sock_diag.h, inet_diag.h): one socket, by its ends.
_NETLINK_SOCK_DIAG, _SOCK_DIAG_BY_FAMILY, _NLMSG_ERROR = 4, 20, 2
_NO_COOKIE = 0xFFFFFFFF
_UID_AT = 16 + 4 + 48 + 12


def peer_uid(peer: tuple, local: tuple) -> int | None:
    """The user owning the other end of a TCP connection from `peer` to `local` (as
    getpeername() and getsockname() give them), when that end is a socket on this host; None
    when it is elsewhere (or already closed). Asks the kernel for that one socket (sock_diag,
    tens of microseconds), else reads /proc/net/tcp. Raises OSError when neither can say."""
    family = socket.AF_INET6 if ":" in peer[0] else socket.AF_INET
    try:
        return _uid_from_sock_diag(family, peer, local)
    except OSError:
        return _uid_from_proc(family, peer, local)


def _packed(family: int, host: str) -> bytes:
    return socket.inet_pton(family, host).ljust(16, b"\0")


def _uid_from_sock_diag(family: int, peer: tuple, local: tuple) -> int | None:
    # The peer's socket: its own end is `peer`, its remote end is `local`.
    sockid = (struct.pack("!HH", peer[1], local[1]) + _packed(family, peer[0])
              + _packed(family, local[0]) + struct.pack("=III", 0, _NO_COOKIE, _NO_COOKIE))
    request = struct.pack("=BBBBI", family, socket.IPPROTO_TCP, 0, 0, 0xFFFFFFFF) + sockid
    header = struct.pack("=IHHII", 16 + len(request), _SOCK_DIAG_BY_FAMILY, 1, 1, 0)
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, _NETLINK_SOCK_DIAG) as nl:
        nl.settimeout(1.0)
        nl.sendall(header + request)
        answer = nl.recv(8192)
    if len(answer) < 20:
        raise OSError("a short sock_diag answer")
    if struct.unpack_from("=H", answer, 4)[0] == _NLMSG_ERROR:
        error = -struct.unpack_from("=i", answer, 16)[0]
        if error == 2:  # ENOENT: no such socket on this host
            return None
        raise OSError(error, os.strerror(error))
    # nlmsghdr (16), then inet_diag_msg: family, state, timer, retrans (4), sockid (48),
    # expires, rqueue, wqueue (12), uid.
    if len(answer) < _UID_AT + 4:
        raise OSError("a short sock_diag answer")
    return struct.unpack_from("=I", answer, _UID_AT)[0]


def _proc_address(family: int, host: str, port: int) -> str:
    raw = socket.inet_pton(family, host)
    words = [raw[i:i + 4][::-1].hex().upper() for i in range(0, len(raw), 4)]  # host order
    return f"{''.join(words)}:{port:04X}"


def _uid_from_proc(family: int, peer: tuple, local: tuple) -> int | None:
    ends = (_proc_address(family, *peer[:2]), _proc_address(family, *local[:2]))
    with open("/proc/net/tcp6" if family == socket.AF_INET6 else "/proc/net/tcp") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 7 and (fields[1], fields[2]) == ends:
                return int(fields[7])
    return None
