"""The dashboard in a real browser: JupyterLab on 127.0.0.1, Debian's headless Chromium driven
by Playwright, runs notebooks/02_step_through_training.ipynb against 4 real MPI engines and
shows one row per rank, each advanced to the last step."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from browser import chromium, jupyter_lab, lab_root, run_notebook_in_lab, save_screenshot

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
        SCREENSHOT_DIR.mkdir(parents=True, exist_ok=True)
        shot = save_screenshot(page, SCREENSHOT_DIR / "02_step_through_training.png")
        text = page.locator(".hangkit-dashboard").text_content()
        assert all(f"rank {r}" in text for r in range(4)), repr(text)
        assert text.count("16/16") == 4, repr(text)
        assert output.count() >= 1
    assert shot.read_bytes().startswith(b"\x89PNG")


LOCATE = Path(__file__).parent.parent / "notebooks" / "03_locate_a_hang.ipynb"


@pytest.mark.timeout(600)
def test_hk_cells_show_the_tree_and_the_verdict_in_jupyterlab(tmp_path):
    """notebooks/03 in JupyterLab: each %%hk cell that hangs comes back with the merged tree and
    its verdict in the cell's output; screenshots of the first two are kept."""
    root = lab_root(tmp_path)
    shutil.copy(LOCATE, root / LOCATE.name)
    with jupyter_lab(root, timeout=90) as server, chromium() as page:
        run_notebook_in_lab(page, server, LOCATE.name, timeout=540,
                            screenshot=tmp_path / "timeout.png")
        SCREENSHOT_DIR.mkdir(parents=True, exist_ok=True)
        for verdict, name in (("[TD-04] rank 2 raised ValueError", "03_ip01_verdict.png"),
                              ("[TD-01] Ranks 0,2,3 wait in all_reduce", "03_td01_verdict.png")):
            cell = page.locator(".jp-Cell", has_text=verdict).first
            cell.wait_for(state="visible", timeout=60_000)
            text = cell.text_content()
            assert "Merged stacks of the ranks' main threads:" in text, text[-2000:]
            assert "hangkit: report: hangkit-notebook-report-" in text, text[-2000:]
            cell.scroll_into_view_if_needed()
            shot = save_screenshot(page, SCREENSHOT_DIR / name)
            assert shot.read_bytes().startswith(b"\x89PNG")
