"""The framed protocol between simssh (the client) and noded (a simulated node's daemon).

A frame is one kind byte, a 4-byte big-endian length, then that many bytes of payload.

    client -> daemon   REQUEST  JSON {"token", "argv", "env": dict or null, "cwd": str or null}
                       STDIN    bytes for the command's stdin; an empty one is its end (EOF)
    daemon -> client   STDOUT, STDERR   bytes the command wrote
                       EXIT     JSON {"code": N} or {"signal": N}: the last frame
                       FAILED   why the request was refused (bad token, bad request)

The client never half-closes its socket: the daemon reads an end of stream as "the client is
gone" and ends the command's session, as PALS ends an application whose launcher died.
Only the standard library: both ends run as scripts, possibly under another interpreter.
"""

from __future__ import annotations

import json
import socket
import struct

REQUEST, STDIN, STDOUT, STDERR, EXIT, FAILED = b"R", b"I", b"O", b"E", b"X", b"F"
_HEADER = struct.Struct(">cI")
MAX_PAYLOAD = 64 << 20  # a request carries a whole environment; nothing near this is legitimate
CHUNK = 65536

# The variables through which simssh finds the daemons (set by tests/simnodes.py).
PORT_VARIABLE = "HANGKIT_SIMNODES_PORT"
TOKEN_FILE_VARIABLE = "HANGKIT_SIMNODES_TOKEN_FILE"


class ProtocolError(Exception):
    """The other end sent something that is not a frame of this protocol."""


def send(sock: socket.socket, kind: bytes, payload: bytes = b"") -> None:
    sock.sendall(_HEADER.pack(kind, len(payload)) + payload)


def send_json(sock: socket.socket, kind: bytes, value: object) -> None:
    send(sock, kind, json.dumps(value).encode())


def _read_exactly(sock: socket.socket, size: int) -> bytes | None:
    """`size` bytes, or None when the stream ends before the first of them."""
    parts, got = [], 0
    while got < size:
        part = sock.recv(min(size - got, CHUNK))
        if not part:
            if got:
                raise ProtocolError(f"stream ended inside a frame ({got} of {size} bytes)")
            return None
        parts.append(part)
        got += len(part)
    return b"".join(parts)


def receive(sock: socket.socket) -> tuple[bytes, bytes] | None:
    """The next (kind, payload), or None at the end of the stream."""
    header = _read_exactly(sock, _HEADER.size)
    if header is None:
        return None
    kind, size = _HEADER.unpack(header)
    if size > MAX_PAYLOAD:
        raise ProtocolError(f"frame of {size} bytes (kind {kind!r})")
    payload = _read_exactly(sock, size) if size else b""
    if payload is None:
        raise ProtocolError(f"stream ended after the header of a {kind!r} frame")
    return kind, payload
