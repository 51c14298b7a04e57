"""WJ-01: a tracker's init waits on a server that accepts the connection and never answers."""

import socket

from hangprog import ready


def init(server):
    conn = socket.create_connection(server.getsockname(), timeout=None)
    return conn.recv(1024)  # the server never sends


server = socket.socket()
server.bind(("127.0.0.1", 0))
server.listen(1)
ready()
init(server)
