"""The browser harness itself: a real JupyterLab in headless Chromium renders ipywidgets."""

from __future__ import annotations

import time

import nbformat
import psutil
import pytest
from browser import chromium, jupyter_lab, lab_root, run_notebook_in_lab, save_screenshot

MARKER = "hangkit-harness-marker-7f3a"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_notebook(path):
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                 "language": "python"}
    nb.cells = [
        nbformat.v4.new_code_cell(
            "import ipywidgets as w\n"
            "bars = [w.IntProgress(value=3, max=10, description=f'rank {i}') for i in range(2)]\n"
            "w.VBox(bars)"),
        nbformat.v4.new_code_cell(f"print({MARKER!r})"),
    ]
    nbformat.write(nb, path)


def processes_mentioning(*needles: str) -> list[str]:
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        line = " ".join(proc.info["cmdline"] or [])
        if any(n in line for n in needles):
            found.append(f"{proc.info['pid']}: {line[:200]}")
    return found


def alive(proc: psutil.Process) -> bool:
    """Running and not a zombie; is_running() also tells a reused pid from the original."""
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.timeout(240)
def test_lab_renders_progress_widgets(tmp_path):
    root = lab_root(tmp_path)
    write_notebook(root / "bars.ipynb")
    shot = tmp_path / "lab.png"
    started = time.monotonic()
    with jupyter_lab(root, timeout=90) as server, chromium() as page:
        run_notebook_in_lab(page, server, "bars.ipynb", timeout=150,
                            screenshot=tmp_path / "timeout.png")
        # ipywidgets 8 renders an IntProgress as .widget-hprogress (7 had .widget-progress)
        bars = page.locator(".jp-OutputArea .jupyter-widgets:is(.widget-hprogress,"
                            " .widget-progress)")
        bars.nth(1).wait_for(state="visible", timeout=60_000)
        assert bars.count() == 2
        assert bars.locator(".widget-label").all_inner_texts() == ["rank 0", "rank 1"]
        fill = bars.first.locator(".progress-bar").evaluate("e => e.style.width")
        assert fill == "30%", f"value 3 of 10 drawn as {fill}"
        # in an output area, not just in the cell's source
        page.locator(".jp-OutputArea-output", has_text=MARKER).wait_for(state="visible")
        save_screenshot(page, shot)
        needles = (str(server.home), f"--ServerApp.port={server.port}")
        server_proc = psutil.Process(server.pid)
        lab_procs = [server_proc, *server_proc.children(recursive=True)]  # server and kernels
    elapsed = time.monotonic() - started

    data = shot.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 1000, f"{len(data)} bytes"
    left = processes_mentioning(*needles)
    left += [f"{p.pid} (server or kernel)" for p in lab_procs if alive(p)]
    assert not left, f"left behind after {elapsed:.0f} s: {left}"
