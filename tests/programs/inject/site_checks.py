"""A plain program that says what its interpreter's start-up left it: which sitecustomize ran,
whether a hangkit directory is on its sys.path, and which threads it has (an agent's is
'hangkit-sidecar'). Prints one JSON line, then exits 0."""

import json
import sys
import threading

site = sys.modules.get("sitecustomize")
print(json.dumps({
    "sitecustomize": getattr(site, "__file__", None),
    "hook_on_path": any("hangkit-hook-" in p for p in sys.path),
    "threads": sorted(t.name for t in threading.enumerate()),
}), flush=True)
