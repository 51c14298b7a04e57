import sys

from hangkit.cli import main

sys.exit(main())
