"""ssh to a simulated node (tests/simnodes.py), through the node's daemon (noded.py).

    simssh [ssh options: -n is honoured, the others ignored] HOST COMMAND...

As with ssh, the COMMAND words are joined with spaces and run by `sh -c` on HOST; this
client's stdin goes to the command (unless -n), the command's stdout and stderr come out of this
client's, and it exits with the command's exit status (128+N when a signal N ended it; 255 when
the node could not be reached). HOST is resolved by this namespace's /etc/hosts; the daemons'
port and token come from $HANGKIT_SIMNODES_PORT and the file named by
$HANGKIT_SIMNODES_TOKEN_FILE. Killing this client ends the command: its daemon sees the
connection go.

Options of its own, for the harness (ssh has no long options, so none can clash):
    --exact          the words after HOST are the command's argv, run without a shell
    --forward-env    the command gets this client's environment (else the daemon's, as ssh
                     gives a login's)
    --cwd=DIR        the command starts in DIR (else in the shared directory)
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

import simproto

# ssh's options that take an argument (OpenSSH 9); all others are flags, e.g. hydra's -x.
_WITH_ARGUMENT = set("BbcDEeFIiJLlmOoPpQRSWw")
_CONNECT_TIMEOUT = 60.0  # seconds; a loaded machine can be slow to accept, never this slow


class UsageError(Exception):
    pass


@dataclass
class Call:
    host: str = ""
    words: list[str] = field(default_factory=list)
    exact: bool = False
    forward_env: bool = False
    cwd: str | None = None
    no_stdin: bool = False  # ssh -n: the command's stdin is empty


def parse(args: list[str]) -> Call:
    call = Call()
    i = 0
    while i < len(args) and args[i].startswith("-"):
        arg = args[i]
        i += 1
        if arg == "--":
            break
        if arg == "--exact":
            call.exact = True
        elif arg == "--forward-env":
            call.forward_env = True
        elif arg.startswith("--cwd="):
            call.cwd = arg.removeprefix("--cwd=")
        elif arg.startswith("--"):
            raise UsageError(f"unknown option {arg}")
        else:  # ssh's: flags, possibly bundled (-xq), or one taking a value (-p 22, -p22)
            for position, letter in enumerate(arg[1:], start=1):
                call.no_stdin |= letter == "n"
                if letter in _WITH_ARGUMENT:
                    if position == len(arg) - 1:
                        i += 1  # the value is the next word
                    break
    if i >= len(args):
        raise UsageError("no host")
    call.host = args[i].rpartition("@")[2]  # user@host: the user does not matter here
    call.words = args[i + 1:]
    if not call.words:
        raise UsageError("no command (an interactive login is not simulated)")
    return call


def write_all(fd: int, data: bytes) -> None:
    try:
        while data:
            data = data[os.write(fd, data):]
    except BrokenPipeError:
        pass  # our reader went; the command keeps running, as with ssh -f


def relay_stdin(sock: socket.socket, no_stdin: bool) -> None:
    try:
        while not no_stdin and (chunk := os.read(0, simproto.CHUNK)):
            simproto.send(sock, simproto.STDIN, chunk)
    except OSError:
        pass  # no stdin (closed), or the connection is gone
    with contextlib.suppress(OSError):
        simproto.send(sock, simproto.STDIN)  # the end of it


def run(call: Call) -> int:
    port = int(os.environ[simproto.PORT_VARIABLE])
    token = Path(os.environ[simproto.TOKEN_FILE_VARIABLE]).read_text().strip()
    address = socket.gethostbyname(call.host)
    if not address.startswith("127."):
        # Simulated nodes live on the loopback addresses; nothing else may be reached.
        print(f"simssh: {call.host} is {address}, not a simulated node", file=sys.stderr)
        return 255
    try:
        sock = socket.create_connection((address, port), timeout=_CONNECT_TIMEOUT)
    except OSError as e:
        print(f"simssh: {call.host} ({address}:{port}): {e}", file=sys.stderr)
        return 255
    sock.settimeout(None)
    argv = call.words if call.exact else ["sh", "-c", " ".join(call.words)]
    simproto.send_json(sock, simproto.REQUEST, {
        "token": token, "argv": argv, "cwd": call.cwd,
        "env": dict(os.environ) if call.forward_env else None})
    threading.Thread(target=relay_stdin, args=(sock, call.no_stdin), daemon=True).start()
    while (frame := simproto.receive(sock)) is not None:
        kind, payload = frame
        if kind == simproto.STDOUT:
            write_all(1, payload)
        elif kind == simproto.STDERR:
            write_all(2, payload)
        elif kind == simproto.EXIT:
            status = json.loads(payload)
            return status["code"] if "code" in status else 128 + status["signal"]
        elif kind == simproto.FAILED:
            print(f"simssh: {call.host} refused: {payload.decode(errors='replace')}",
                  file=sys.stderr)
            return 255
    print(f"simssh: connection to {call.host} closed before the command ended",
          file=sys.stderr)
    return 255


def main() -> int:
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # ^C ends the client quietly, as SIGTERM does
    try:
        call = parse(sys.argv[1:])
    except UsageError as e:
        print(f"simssh: {e}\nusage: simssh [ssh options] HOST COMMAND...", file=sys.stderr)
        return 255
    try:
        return run(call)
    except (OSError, KeyError, ValueError, simproto.ProtocolError) as e:
        print(f"simssh: {type(e).__name__}: {e}", file=sys.stderr)
        return 255


if __name__ == "__main__":
    code = main()
    sys.stderr.flush()
    # Not sys.exit: the stdin thread may be blocked in a read that must not delay the exit.
    os._exit(code)
