"""The main thread spins in pure Python holding the GIL (IP-04: busy, not deadlocked)."""

from hangprog import ready


def spin_forever():
    x = 0
    while True:
        x += 1


ready()
spin_forever()
