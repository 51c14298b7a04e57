"""Records: the one language between layers.

Plain dataclasses with to_json()/from_json(). Capture produces them; the terminal summary, the
Markdown report, the JSON file and the widgets are pure functions of them.

Reading is tolerant, so that a report written by one version opens in the next: from_json
ignores keys it does not know, fills fields that are missing with their defaults, and reads a
value of an enum it does not know as that enum's fallback. HangReport and the doctor's JSON
carry SCHEMA, raised when a field changes meaning (not when one is added). A report's field of
the wrong type (text where a number belongs), at any depth, reads as its default and is named
(HangReport.from_json's `problems`, base.conform): read_report refuses such a file in one
line, show_report shows it and says what it could not read.
"""

from hangkit.records.base import (
    SCHEMA,
    Activity,
    ProcessState,
    RankState,
    Record,
    Role,
    WorkerPhase,
    parse_enum,
)
from hangkit.records.capture import (
    Diagnosis,
    Frame,
    HangReport,
    Look,
    NodeReport,
    ProcessLook,
    ProcessSnapshot,
    Recording,
    StackGroup,
    Syscall,
    ThreadStack,
    TreeNode,
)
from hangkit.records.progress import (
    PROBE_STATUSES,
    Beat,
    CollectiveState,
    ProbeResult,
    RankStatus,
    StallEvent,
    WorkerState,
)

__all__ = ["PROBE_STATUSES", "SCHEMA", "Activity", "Beat", "CollectiveState", "Diagnosis",
           "Frame", "HangReport", "Look", "NodeReport", "ProbeResult", "ProcessLook",
           "ProcessSnapshot", "ProcessState", "RankState", "RankStatus", "Record", "Recording",
           "Role", "StackGroup", "StallEvent", "Syscall", "ThreadStack", "TreeNode",
           "WorkerPhase", "WorkerState", "parse_enum"]
