"""The merged stack tree as HTML a person can read at 64 ranks: each class of ranks (the ranks
that end at the same leaf) has its colour, the smaller classes (the odd ones out) come first,
long chains of frames every rank shares are folded, and the diagnosis stands beside the tree.

A pure function of the records (TreeNode, Diagnosis); no widgets imported.
"""

from __future__ import annotations

import html

from hangkit.monitor.stacks import frame_text
from hangkit.records import Diagnosis, TreeNode
from hangkit.text import who

FOLD = 4  # a chain of more single children than this is folded, its first and last shown
# The largest class is the crowd, in grey; the others, which the eye should find, in colours.
CROWD = "#90a4ae"
ODD = ("#d32f2f", "#7b1fa2", "#ef6c00", "#1565c0", "#2e7d32", "#6d4c41", "#c2185b", "#00838f")


def classes(root: TreeNode) -> list[frozenset[int]]:
    """The rank sets of the tree's leaves, smallest first (the odd ones out)."""
    found: list[frozenset[int]] = []

    def walk(node: TreeNode) -> None:
        if not node.children and node.frame is not None:
            found.append(frozenset(node.ranks))
        for child in node.children:
            walk(child)

    walk(root)
    return sorted(set(found), key=lambda c: (len(c), sorted(c)))


def colours(root: TreeNode) -> dict[frozenset[int], str]:
    ordered = classes(root)
    crowd = max(ordered, key=len) if len(ordered) > 1 else None
    odd = iter(ODD * (len(ordered) // len(ODD) + 1))
    return {c: CROWD if c == crowd else next(odd) for c in ordered}


def tree_html(root: TreeNode | None, diagnoses: list[Diagnosis] = ()) -> str:
    """The tree (and the diagnoses beside it) as one HTML fragment."""
    if root is None or not root.children:
        return "<i>no stacks</i>"
    palette = colours(root)

    def chips(node: TreeNode) -> str:
        mine = set(node.ranks)
        return "".join(f"<span title='{html.escape(who(sorted(c)))}' style='display:inline-block;"
                       f"width:10px;height:10px;margin-right:2px;background:{colour}'></span>"
                       for c, colour in palette.items() if c & mine)

    def line(node: TreeNode) -> str:
        return (f"<div style='white-space:nowrap'>{chips(node)} "
                f"<b>[{html.escape(who(node.ranks, node.pids))}]</b> "
                f"{html.escape(frame_text(node.frame))}</div>")

    def walk(node: TreeNode) -> str:
        chain = [node]
        while len(chain[-1].children) == 1:
            chain.append(chain[-1].children[0])
        if len(chain) > FOLD:
            middle = "".join(line(n) for n in chain[1:-1])
            out = (line(chain[0]) + f"<details><summary style='color:#607d8b'>{len(chain) - 2} "
                   f"frames more</summary>{middle}</details>" + line(chain[-1]))
        else:
            out = "".join(line(n) for n in chain)
        children = sorted(chain[-1].children, key=lambda c: (len(c.ranks), sorted(c.ranks)))
        return out + "".join(f"<div style='margin-left:16px;border-left:1px solid #cfd8dc;"
                             f"padding-left:6px'>{walk(c)}</div>" for c in children)

    tree = "".join(walk(c) for c in sorted(root.children, key=lambda c: len(c.ranks)))
    verdicts = "".join(f"<p><b>[{html.escape(d.kind)}]</b> {html.escape(d.summary)}<br>"
                       f"<i>{html.escape(d.advice)}</i></p>" for d in diagnoses)
    beside = (f"<div style='flex:1;min-width:260px;margin-left:16px'>{verdicts}</div>"
              if verdicts else "")
    return (f"<div style='display:flex;align-items:flex-start'><div style='font-family:monospace;"
            f"font-size:12px;overflow-x:auto'>{tree}</div>{beside}</div>")
