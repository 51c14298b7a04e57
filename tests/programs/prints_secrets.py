"""A job whose output, command line and thread names hold secrets, then hangs: every line after
`--print` is printed, a thread named after `--thread-name` waits beside the main thread, and
the main thread waits on an event nothing sets. tests/test_redaction.py searches every file
hangkit writes about it for the secrets."""

import sys
import threading

from hangprog import heartbeat, ready

heartbeat()
args = sys.argv[1:]
name = args[args.index("--thread-name") + 1]
threading.Thread(target=threading.Event().wait, name=name, daemon=True).start()
for i, arg in enumerate(args):
    if arg == "--print":
        print(args[i + 1], flush=True)
ready(thread=name)
threading.Event().wait()
