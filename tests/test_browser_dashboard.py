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
