"""Stacks of a cluster's engines and of their children (DataLoader workers), merged.

The same path as `hangkit watch`: a look at every engine (monitor/confirm.py: samples, then one
capture_job), then build_report, whose tree and diagnosis the notebook shows. The look goes to
the monitor too, so an engine seen progressing reads busy, not stalled, on the dashboard: the
classes watch decides by.
"""

from __future__ import annotations

import contextlib
import re

from hangkit.records import Activity, Diagnosis, HangReport, TreeNode

# Where ipykernel says a cell's code is: a file per engine (its pid in the path) named by a
# hash of the cell's code, and only written with the debugger on.
_ENGINE_CELL_FILE = re.compile(r"\S*ipykernel_\d+/(\d+)\.py")


def engine_pids(cluster) -> list[int]:
    """The engines on this host and their children (DataLoader workers); engines on other
    nodes are seen through their agents only."""
    import psutil

    pids = []
    for info in cluster.engines.values():
        if info["host"] != cluster.monitor.host:
            continue
        with contextlib.suppress(psutil.Error):
            proc = psutil.Process(info["pid"])
            pids += [proc.pid] + [c.pid for c in proc.children(recursive=True)]
    return pids


def look_at_engines(cluster, *, why: str = "stacks captured from the notebook") -> HangReport:
    """One look at every engine, as a report (not written anywhere): its processes, tree,
    diagnosis and the look itself (report.looks[-1]: who is progressing)."""
    from hangkit.monitor.confirm import Confirmation
    from hangkit.monitor.report import build_report

    monitor = cluster.monitor
    ranks = monitor.statuses()
    confirmation = Confirmation()
    look = confirmation.look(monitor, ranks, engine_pids(cluster), at=0.0)
    monitor.note_look(look)
    report = build_report(reason=why, command=[], idle_seconds=0.0,
                          processes=confirmation.snapshots, last_lines=[], context={},
                          detector="notebook", capture_seconds=look.capture_seconds,
                          ranks=ranks, events=monitor.active_events(), looks=[look],
                          nodes=confirmation.nodes)
    name_cell_files(report)
    return report


def name_cell_files(report: HangReport) -> None:
    """Each engine's file of a cell renamed after the cell alone (hk-cell-HASH.py), and the
    groups and the tree made again from them: ranks at one line of one cell merge. (The
    diagnosis was made before, from the files' own lines.)"""
    from hangkit.monitor.merge import groups, merged_tree

    for p in report.processes:
        for t in p.threads:
            for f in t.frames:
                m = _ENGINE_CELL_FILE.fullmatch(f.file)
                if m:
                    f.file = f"hk-cell-{m.group(1)}.py"
    report.groups, report.tree = groups(report.processes), merged_tree(report.processes)


def progressing(report: HangReport, ranks=None) -> list:
    """The ranks (of `ranks`, None: all) its look found progressing: not a hang while they do."""
    return [p for p in report.looks[-1].processes if p.deciding and p.rank is not None
            and p.activity == Activity.PROGRESSING and (ranks is None or p.rank in ranks)]


def capture_engines(cluster) -> tuple[TreeNode | None, list[Diagnosis]]:
    """The merged tree and the diagnosis of the engines as they are now."""
    report = look_at_engines(cluster)
    if not report.processes:
        return None, []
    return report.tree, report.diagnosis


def innermost(tree: TreeNode | None) -> list[tuple[list[int], str]]:
    """(ranks, "function (file:line)") where each group of ranks' main thread is."""
    out = []

    def walk(node: TreeNode) -> None:
        if not node.children and node.frame is not None:
            f = node.frame
            out.append((node.ranks, f"{f.function} ({f.file}:{f.line})"))
        for child in node.children:
            walk(child)

    if tree is not None:
        walk(tree)
    return out
