"""show_report: a hang report opened in the notebook (a pure renderer of the report's records,
so they are built by hand here; notebooks/05 opens a real one)."""

from __future__ import annotations

import pytest

from hangkit.errors import UsageError
from hangkit.jupyter import show_report
from hangkit.monitor.report import write_report
from hangkit.records import CollectiveState, Diagnosis, HangReport, RankStatus

pytestmark = pytest.mark.timeout(60)


def report() -> HangReport:
    ranks = [RankStatus(key=f"rank {r}", rank=r, pid=100 + r, host="node1",
                        status="stalled" if r == 1 else "waiting", step=3 if r == 1 else 4,
                        collective=CollectiveState("torch", "world", "all_reduce", 9,
                                                   inside=r != 1, seconds=30.0))
             for r in range(3)]
    return HangReport(hang=True, reason="no output for 600 s (--timeout 600)",
                      command=["python", "train.py"], idle_seconds=600.0, ranks=ranks,
                      diagnosis=[Diagnosis("TD-01", "Ranks 0,2 wait in all_reduce #9; rank 1 "
                                           "never issued it", "make every rank take part",
                                           ranks=[1])])


def test_a_written_report_opens_with_its_verdict_ranks_and_plot(tmp_path):
    write_report(report(), tmp_path / "job")
    view = show_report(tmp_path / "job")
    assert "[TD-01] Ranks 0,2 wait in all_reduce #9; rank 1 never issued it" in view.text()
    rows = view.rank_rows()
    assert [r[:3] for r in rows] == [["rank 0", "waiting", "4"], ["rank 1", "stalled", "3"],
                                     ["rank 2", "waiting", "4"]]
    assert rows[0][4].startswith("all_reduce #9 (inside")
    bars = view.figure().axes[0].patches
    assert [b.get_height() for b in bars] == [4, 3, 4]
    assert bars[1].get_facecolor() != bars[0].get_facecolor()  # the stalled rank stands out
    assert show_report(tmp_path / "job" / "hang-report.json").report.reason == report().reason


def test_a_path_that_is_no_report_is_one_clear_error(tmp_path):
    with pytest.raises(UsageError, match="no such file or directory"):
        show_report(tmp_path / "nothing")
    (tmp_path / "hang-report.json").write_text("[1, 2]")
    with pytest.raises(UsageError, match="not a hang report"):
        show_report(tmp_path)


def test_the_tree_reads_at_64_ranks(tmp_path):
    """63 ranks in an all-reduce, rank 17 elsewhere: its class comes first and has a colour of
    its own, the long shared chain is folded, the diagnosis stands beside the tree."""
    from hangkit.jupyter.tree_view import CROWD, tree_html
    from hangkit.records import Frame, TreeNode

    def chain(frames, ranks, leaf):
        node = leaf
        for f in reversed(frames):
            node = TreeNode(frame=Frame(f, "train.py", 1), ranks=ranks, children=[node])
        return node

    everyone = list(range(64))
    crowd = [r for r in everyone if r != 17]
    waiting = chain(["train_step", "backward", "all_reduce"], crowd,
                    TreeNode(frame=Frame("wait", "c10d.py", 9), ranks=crowd))
    odd = TreeNode(frame=Frame("save_checkpoint", "train.py", 30), ranks=[17])
    shared = chain([f"layer{i}" for i in range(8)], everyone,
                   TreeNode(frame=Frame("main", "train.py", 2), ranks=everyone,
                            children=[waiting, odd]))
    page = tree_html(TreeNode(frame=None, ranks=everyone, children=[shared]),
                     [Diagnosis("TD-01", "rank 17 never issued it", "advice")])
    assert page.index("[rank 17]") < page.index("[ranks 0-16,18-63]</b> train_step")
    assert "<details>" in page and "frames more</summary>" in page
    assert page.count(f"background:{CROWD}") >= 1 and "background:#d32f2f" in page
    assert "display:flex" in page and "[TD-01]</b> rank 17 never issued it" in page
