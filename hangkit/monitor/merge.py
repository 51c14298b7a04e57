"""Merging many processes' stacks: groups by location, and the STAT-style prefix tree."""

from __future__ import annotations

from hangkit.monitor.stacks import (
    frame_text,
    innermost_python_frame,
    innermost_user_frame,
    main_location,
    tree_frames,
)
from hangkit.records import Frame, ProcessSnapshot, Role, StackGroup, TreeNode
from hangkit.text import who


def rank_processes(processes: list[ProcessSnapshot]) -> list[ProcessSnapshot]:
    """The ranks' processes, by rank: nodes answer a capture in any order, and the tree and
    the groups must read the same whatever it was."""
    return sorted((p for p in processes if p.role == Role.RANK),
                  key=lambda p: (p.rank is None, p.rank or 0, p.host or "", p.pid))


def groups(processes: list[ProcessSnapshot]) -> list[StackGroup]:
    """Ranks whose main threads stand at the same innermost frame of the user's own code."""
    by_key: dict[tuple, StackGroup] = {}
    for p in rank_processes(processes):
        thread = p.main_thread
        frame = (innermost_user_frame(thread) or innermost_python_frame(thread)) if thread else None
        key = (frame.function, frame.file, frame.line) if frame else ("", main_location(p), None)
        group = by_key.get(key)
        if group is None:
            group = by_key[key] = StackGroup(location=main_location(p), ranks=[], pids=[],
                                             frames=list(thread.frames) if thread else [])
        if p.rank is not None:
            group.ranks.append(p.rank)
        group.pids.append(p.pid)
    return sorted(by_key.values(), key=lambda g: (-len(g.pids), min(g.ranks or g.pids)))


def merged_tree(processes: list[ProcessSnapshot]) -> TreeNode:
    """A prefix tree of the ranks' main stacks; each node carries the ranks that pass through it.

    Built with a dict of children and sets of ranks per node, sorted once at the end: 2,240
    stacks of 40 frames merge in well under 0.2 s.
    """
    root = _Building(TreeNode(frame=None))
    for p in rank_processes(processes):
        if p.main_thread is None:
            continue
        node = root
        node.add(p)
        for frame in tree_frames(p.main_thread):
            node = node.child(frame)
            node.add(p)
    return root.finish()


class _Building:
    __slots__ = ("node", "ranks", "children")

    def __init__(self, node: TreeNode):
        self.node, self.ranks, self.children = node, set(), {}

    def add(self, p: ProcessSnapshot) -> None:
        if p.rank is not None:
            self.ranks.add(p.rank)
        self.node.pids.append(p.pid)

    def child(self, frame: Frame) -> _Building:
        key = (frame.function, frame.file, frame.line)
        found = self.children.get(key)
        if found is None:
            found = self.children[key] = _Building(TreeNode(frame=frame))
        return found

    def finish(self) -> TreeNode:
        self.node.ranks = sorted(self.ranks)
        self.node.children = [c.finish() for c in self.children.values()]
        return self.node


def render_tree(root: TreeNode) -> list[str]:
    """The tree as text lines, each node labelled with its rank set, STAT-style.

    A chain of single children stays in one column; only where ranks part ways does the text
    branch and indent, so the split that explains a hang is what catches the eye.
    """
    lines: list[str] = []

    def label(node: TreeNode) -> str:
        return f"[{who(node.ranks, node.pids)}] {frame_text(node.frame)}"

    def walk(node: TreeNode, first: str, rest: str) -> None:
        lines.append(first + label(node))
        if len(node.children) == 1:
            walk(node.children[0], rest, rest)
            return
        for i, child in enumerate(node.children):
            last = i == len(node.children) - 1
            walk(child, rest + ("└─ " if last else "├─ "), rest + ("   " if last else "│  "))

    if len(root.children) == 1:
        walk(root.children[0], "", "")
    else:
        for i, child in enumerate(root.children):
            last = i == len(root.children) - 1
            walk(child, "└─ " if last else "├─ ", "   " if last else "│  ")
    return lines
