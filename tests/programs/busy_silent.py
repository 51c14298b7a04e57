"""Prints once, then is silent but busy for SECONDS: it imports one freshly written module after
another, each doing a little work at import, as a rank importing torch on a loaded machine does
(its stack moves from module to module). Then it prints and exits 0: nothing was hung."""

import importlib
import os
import shutil
import sys
import tempfile
import time

seconds = float(sys.argv[1])
print("started", flush=True)
# In the working directory (the test's tmp_path), so a run that watch ends leaves nothing in /tmp.
modules = tempfile.mkdtemp(prefix="hk-busy-", dir=os.getcwd())
sys.path.insert(0, modules)
ends = time.monotonic() + seconds
n = 0
while time.monotonic() < ends:
    name = f"busy_module_{n}"
    with open(os.path.join(modules, name + ".py"), "w") as f:
        # Module-level work, so the import itself is where the time goes.
        f.write("import time\nt = time.process_time()\nwhile time.process_time() - t < 0.03:\n"
                "    pass\n")
    importlib.import_module(name)
    n += 1
shutil.rmtree(modules)
print(f"imported {n} modules", flush=True)
