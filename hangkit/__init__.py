"""hangkit: prevent, detect, locate and explain hangs in distributed PyTorch training."""

from hangkit.errors import CaptureError, HangkitError, UsageError
from hangkit.records import (
    Diagnosis,
    Frame,
    HangReport,
    ProcessSnapshot,
    StackGroup,
    ThreadStack,
    TreeNode,
)

__version__ = "0.1.0"

__all__ = [
    "CaptureError",
    "Diagnosis",
    "Frame",
    "HangReport",
    "HangkitError",
    "ProcessSnapshot",
    "StackGroup",
    "ThreadStack",
    "TreeNode",
    "UsageError",
    "__version__",
]
