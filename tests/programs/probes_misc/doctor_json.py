"""Runs doctor probes and prints, as one JSON line, whether each named module can be found by
this interpreter and the probes' results. For tests that need an interpreter where an optional
package is really not installed: usage, python doctor_json.py PROBES MODULE[,MODULE...]."""

import importlib.util
import json
import sys

from hangkit.probes.runner import run_doctor

probes, modules = sys.argv[1], sys.argv[2].split(",")
print(json.dumps({
    "found": {m: importlib.util.find_spec(m) is not None for m in modules},
    "results": [r.to_json() for r in run_doctor(probes, timeout=30)],
}))
