"""`python -m hangkit.bundle ...`: the same as `hangkit report ...`."""

from __future__ import annotations

import sys

from hangkit.bundle.command import main

sys.exit(main())
