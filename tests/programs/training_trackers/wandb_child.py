"""Runs hangkit.training.trackers.init_wandb the way a training script would, and prints what
came of it as one JSON line (after "RESULT "). Its log lines go to stderr."""

import argparse
import json
import logging
import sys
import time

import psutil

from hangkit.deadline import abandoned
from hangkit.training.trackers import init_wandb

parser = argparse.ArgumentParser()
parser.add_argument("--timeout", type=float, default=5.0)
parser.add_argument("--rank", type=int, default=None)
parser.add_argument("--id", default=None, help="a run id (an invalid one makes init fail)")
args = parser.parse_args()
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s: %(message)s")

extra = {"id": args.id} if args.id else {}
started = time.monotonic()
tracker = init_wandb(project="hangkit-test", timeout=args.timeout, rank=args.rank, **extra)
init_seconds = time.monotonic() - started
for step in range(3):
    tracker.log({"loss": 1.0 / (step + 1)})
started = time.monotonic()
tracker.finish(timeout=10)
finish_seconds = time.monotonic() - started
tracker.log({"after": 1})  # after finish: dropped, never raises
services = [p.name() for p in psutil.Process().children(recursive=True)]
print("RESULT " + json.dumps({
    "mode": tracker.mode, "reason": tracker.reason, "init_seconds": init_seconds,
    "finish_seconds": finish_seconds, "failures": tracker.failures, "dropped": tracker.dropped,
    "wandb_imported": "wandb" in sys.modules, "children": services,
    "abandoned": [a.name for a in abandoned()]}), flush=True)
