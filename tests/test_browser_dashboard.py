"""The dashboard in a real browser: JupyterLab on 127.0.0.1, Debian's headless Chromium driven
by Playwright, runs notebooks/02_step_through_training.ipynb against 4 real MPI engines and
shows one row per rank, each advanced to the last step."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from browser import (
    check_shows_something,
    chromium,
    jupyter_lab,
    lab_root,
    run_notebook_in_lab,
    save_element_screenshot,
)

NOTEBOOK = Path(__file__).parent.parent / "notebooks" / "02_step_through_training.ipynb"
SCREENSHOT_DIR = Path(__file__).parent.parent / "build" / "screenshots"


@pytest.mark.timeout(420)
def test_step_through_training_dashboard_shows_every_rank_advancing(tmp_path):
    root = lab_root(tmp_path)
    shutil.copy(NOTEBOOK, root / NOTEBOOK.name)
    with jupyter_lab(root, timeout=90) as server, chromium() as page:
        run_notebook_in_lab(page, server, NOTEBOOK.name, timeout=360,
                            screenshot=tmp_path / "timeout.png")
        output = page.locator(".jp-OutputArea").first.locator("xpath=..")
        bars = page.locator(".hangkit-dashboard .widget-hprogress")
        bars.nth(3).wait_for(state="visible", timeout=60_000)
        assert bars.count() == 4, f"{bars.count()} progress bars"
        # 16 steps of 4 epochs: the end is reported as step 16, a full bar.
        fills = [bars.nth(i).locator(".progress-bar").evaluate("e => e.style.width")
                 for i in range(4)]
        assert fills == ["100%"] * 4, fills
        dashboard = page.locator(".hangkit-dashboard").first
        text = dashboard.text_content()
        assert all(f"rank {r}" in text for r in range(4)), repr(text)
        assert text.count("16/16") == 4, repr(text)
        assert output.count() >= 1
        # The dashboard itself, as a person sees it: its rows, not an empty panel.
        shot = save_element_screenshot(dashboard,
                                       SCREENSHOT_DIR / "02_step_through_training.png")
    check_shows_something(shot)


LOCATE = Path(__file__).parent.parent / "notebooks" / "03_locate_a_hang.ipynb"


@pytest.mark.timeout(600)
def test_hk_cells_show_the_tree_and_the_verdict_in_jupyterlab(tmp_path):
    """notebooks/03 in JupyterLab: each %%hk cell that hangs comes back with the merged tree and
    its verdict in the cell's output; screenshots of the first two verdicts' outputs are kept,
    and each must show something, and not what the other shows."""
    root = lab_root(tmp_path)
    shutil.copy(LOCATE, root / LOCATE.name)
    with jupyter_lab(root, timeout=90) as server, chromium() as page:
        run_notebook_in_lab(page, server, LOCATE.name, timeout=540,
                            screenshot=tmp_path / "timeout.png")
        shots: list[Path] = []
        for verdict, name in (("[TD-04] rank 2 raised ValueError", "03_ip01_verdict.png"),
                              ("[TD-01] Ranks 0,2,3 wait in all_reduce", "03_td01_verdict.png")):
            cell = page.locator(".jp-Cell", has_text=verdict).first
            cell.wait_for(state="visible", timeout=60_000)
            output = cell.locator(".jp-Cell-outputArea").first
            text = output.text_content()
            assert verdict in text and "Diagnosis:" in text, text[-2000:]
            assert "Merged stacks of the ranks' main threads:" in text, text[-2000:]
            assert "hangkit: report: hangkit-notebook-report-" in text, text[-2000:]
            shots.append(save_element_screenshot(output, SCREENSHOT_DIR / name))
    for i, shot in enumerate(shots):
        check_shows_something(shot, others=tuple(shots[:i]))


@pytest.mark.timeout(60)
def test_a_screenshot_check_fails_on_one_colour_and_on_a_copy(tmp_path):
    """What the browser tests ask of a screenshot, on PNGs made here: an empty panel (one
    colour, or a border on it) fails, text passes, and the same pixels as another fail."""
    import numpy as np
    from matplotlib.figure import Figure
    from matplotlib.image import imsave

    def png(name: str, words: str | None) -> Path:
        fig = Figure(figsize=(4, 1), dpi=100)
        if words:
            fig.text(0.02, 0.5, words, family="monospace")
        fig.savefig(tmp_path / name, facecolor="white")
        return tmp_path / name

    blank, verdict, other = png("blank.png", None), png("a.png", "[TD-04] rank 2 raised"), \
        png("b.png", "[TD-01] Ranks 0,2,3 wait")
    with pytest.raises(AssertionError, match="nearly one colour"):
        check_shows_something(blank)
    framed = np.ones((100, 400, 3))
    framed[0, :] = 0  # a panel's border: one line of ink is no content
    imsave(tmp_path / "framed.png", framed)
    with pytest.raises(AssertionError, match="nearly one colour"):
        check_shows_something(tmp_path / "framed.png")
    check_shows_something(verdict)
    check_shows_something(other, others=(verdict,))
    shutil.copy(verdict, tmp_path / "copy.png")
    with pytest.raises(AssertionError, match="same pixels"):
        check_shows_something(tmp_path / "copy.png", others=(verdict,))
