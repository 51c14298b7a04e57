"""hangkit: prevent, detect, locate and explain hangs in distributed PyTorch training."""

from hangkit.agent import instrument, progress, start_agent, stop_agent
from hangkit.errors import CaptureError, HangkitError, UsageError
from hangkit.records import (
    Beat,
    CollectiveState,
    Diagnosis,
    Frame,
    HangReport,
    ProbeResult,
    ProcessSnapshot,
    ProcessState,
    RankState,
    RankStatus,
    Role,
    StackGroup,
    StallEvent,
    ThreadStack,
    TreeNode,
    WorkerPhase,
    WorkerState,
)

__version__ = "0.1.0"

__all__ = [
    "Beat",
    "CaptureError",
    "CollectiveState",
    "Diagnosis",
    "Frame",
    "HangReport",
    "HangkitError",
    "Monitor",
    "ProbeResult",
    "ProcessSnapshot",
    "ProcessState",
    "RankState",
    "RankStatus",
    "Role",
    "StackGroup",
    "StallEvent",
    "ThreadStack",
    "TreeNode",
    "UsageError",
    "WorkerPhase",
    "WorkerState",
    "__version__",
    "doctor",
    "instrument",
    "progress",
    "start_agent",
    "stop_agent",
]


def __getattr__(name: str):
    # The monitor pulls in pyzmq and psutil; a rank that only calls progress() never needs it.
    if name == "Monitor":
        from hangkit.monitor.server import Monitor

        return Monitor
    if name == "doctor":  # the doctor's probes as records, for notebooks and scripts
        from hangkit.probes.runner import run_doctor

        return run_doctor
    raise AttributeError(f"module 'hangkit' has no attribute {name!r}")
