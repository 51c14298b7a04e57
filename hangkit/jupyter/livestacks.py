"""Stacks of a cluster's engines and of their children (DataLoader workers), merged."""

from __future__ import annotations

import contextlib

from hangkit.records import Diagnosis, ProcessSnapshot, TreeNode


def engine_processes(cluster) -> list[ProcessSnapshot]:
    """Every engine's stacks (its agent; faulthandler when the GIL is held) and, for engines
    on this host, their children's (py-spy)."""
    import psutil

    from hangkit.monitor.watch import capture_job

    pids = []
    for info in cluster.engines.values():
        if info["host"] != cluster.monitor.host:
            continue
        with contextlib.suppress(psutil.Error):
            proc = psutil.Process(info["pid"])
            pids += [proc.pid] + [c.pid for c in proc.children(recursive=True)]
    return capture_job(cluster.monitor, cluster.monitor.statuses(), pids)


def capture_engines(cluster) -> tuple[TreeNode | None, list[Diagnosis]]:
    from hangkit.monitor.diagnose import diagnose
    from hangkit.monitor.merge import merged_tree

    processes = engine_processes(cluster)
    if not processes:
        return None, []
    return merged_tree(processes), diagnose(processes, cluster.monitor.active_events())


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
