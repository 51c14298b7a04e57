"""A module whose import never returns, like a package reading from a stalled filesystem: for
the imports probe's HANGKIT_DOCTOR_IMPORTS. Nothing ever sets the event."""

import threading

threading.Event().wait()
