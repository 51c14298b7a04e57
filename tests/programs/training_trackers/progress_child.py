"""Iterates a hangkit progress_bar over 5 items (plain lines after every item) and prints DONE."""

import sys

from hangkit.training.environment import progress_bar

for _ in progress_bar(range(5), desc="epoch", log_every=0.0):
    pass
print("DONE", flush=True)
sys.exit(0)
