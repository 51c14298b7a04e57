"""Runs the doctor under resource limits, as `ulimit` in a job script would set them, and prints
its results as one JSON list on stdout.

usage: limited_doctor.py [--nofile N] [--address-space BYTES] --only NAMES --timeout S

The limits are set in this process before the doctor starts, so the doctor, its probes and
everything they start inherit them, exactly as under a shell's `ulimit -n N` / `ulimit -v KB`.
"""

import argparse
import json
import resource
import sys


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--nofile", type=int, default=None)
    parser.add_argument("--address-space", type=int, default=None)
    parser.add_argument("--only", required=True)
    parser.add_argument("--timeout", type=float, required=True)
    args = parser.parse_args()
    if args.nofile is not None:
        resource.setrlimit(resource.RLIMIT_NOFILE,
                           (args.nofile, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    if args.address_space is not None:
        resource.setrlimit(resource.RLIMIT_AS,
                           (args.address_space, resource.getrlimit(resource.RLIMIT_AS)[1]))
    from hangkit.probes.runner import run_doctor

    results = run_doctor(args.only, timeout=args.timeout)
    print(json.dumps([r.to_json() for r in results]), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
