"""A retry loop that never succeeds and never prints: it alternates between trying and backing
off, two stacks over and over (a connection that is refused, a lock that is never free)."""

import time

from hangprog import ready


def try_to_connect():
    time.sleep(0.07)  # ok-sleep: the attempt


def back_off():
    time.sleep(0.11)  # ok-sleep: the pause before the next one


ready()
while True:
    try_to_connect()
    back_off()
