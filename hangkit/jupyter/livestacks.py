"""Stacks of a cluster's engines and of their children (DataLoader workers), merged.

The same path as `hangkit watch`: capture_job, then build_report, whose tree and diagnosis
the notebook shows."""

from __future__ import annotations

import contextlib
import time

from hangkit.records import Diagnosis, ProcessSnapshot, RankStatus, TreeNode


def engine_processes(cluster, ranks: list[RankStatus]) -> list[ProcessSnapshot]:
    """Every engine's stacks (its agent; faulthandler when the GIL is held) and, for engines
    on this host, their children's (py-spy)."""
    import psutil

    from hangkit.monitor.capture import capture_job

    pids = []
    for info in cluster.engines.values():
        if info["host"] != cluster.monitor.host:
            continue
        with contextlib.suppress(psutil.Error):
            proc = psutil.Process(info["pid"])
            pids += [proc.pid] + [c.pid for c in proc.children(recursive=True)]
    return capture_job(cluster.monitor, ranks, pids)


def capture_engines(cluster) -> tuple[TreeNode | None, list[Diagnosis]]:
    """The merged tree and the diagnosis of the engines as they are now."""
    from hangkit.monitor.report import build_report

    started = time.monotonic()
    ranks = cluster.monitor.statuses()
    processes = engine_processes(cluster, ranks)
    if not processes:
        return None, []
    report = build_report(reason="stacks captured from the notebook", command=[],
                          idle_seconds=0.0, processes=processes, last_lines=[], context={},
                          detector="notebook", capture_seconds=time.monotonic() - started,
                          ranks=ranks, events=cluster.monitor.active_events())
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
