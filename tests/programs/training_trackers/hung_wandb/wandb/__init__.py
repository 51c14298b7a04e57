"""Stands in for wandb on a hung filesystem: importing it never returns. Put on PYTHONPATH by
test_training_trackers so that `import wandb` finds this first."""

import threading

threading.Event().wait()
