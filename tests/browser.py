"""Drives a real JupyterLab in headless Chromium, for browser tests.

    with jupyter_lab(root) as server, chromium() as page:
        run_notebook_in_lab(page, server, "demo.ipynb", timeout=120)
        page.locator(".widget-hprogress").first.wait_for()

The server runs with its config, data and runtime directories in a fresh temporary directory, so
the user's Jupyter and IPython config is never read; it is stopped, with the kernels it started,
when the context manager exits. Every wait has a deadline; failures carry what was observed (the
server's last output, the notebook's state) and save a screenshot.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

__all__ = [
    "CHROMIUM",
    "CHROMIUM_ARGS",
    "LabError",
    "LabServer",
    "LabTimeout",
    "NotebookError",
    "chromium",
    "have_chromium",
    "jupyter_lab",
    "check_shows_something",
    "run_notebook_in_lab",
    "save_element_screenshot",
    "save_screenshot",
]

# Playwright's own browser download does not work where these tests run: use the distribution's.
CHROMIUM = Path(os.environ.get("HANGKIT_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = (
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)
_POLL = 0.2  # seconds between looks at something we wait for
_OUTPUT_TAIL = 4000  # characters of the server's output put into an error
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")  # IPython colours its tracebacks


class LabError(RuntimeError):
    """The JupyterLab server or the page did not do what the harness asked."""


class LabTimeout(LabError, TimeoutError):
    """A wait on the server or the page ran past its deadline."""


class NotebookError(LabError):
    """A cell of the notebook run in the lab raised."""


@dataclass
class LabServer:
    """A running `jupyter lab`; `url` ends with a slash."""

    url: str
    token: str
    port: int
    root: Path
    home: Path  # the temporary directory holding config, data, runtime and the server's log
    process: subprocess.Popen = field(repr=False)

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def log_path(self) -> Path:
        return self.home / "server.log"

    def lab_url(self, path: str = "") -> str:
        """The URL that opens JupyterLab on `path` (relative to `root`), with a fresh workspace."""
        tree = f"tree/{urllib.parse.quote(path)}" if path else ""
        query = urllib.parse.urlencode({"reset": "", "token": self.token})
        return f"{self.url}lab/{tree}?{query}"

    def api(self, method: str, path: str, *, timeout: float = 10) -> Any:
        """One call to the server's REST API (`path` like "api/kernels"); the decoded JSON."""
        request = urllib.request.Request(
            self.url + path, method=method, headers={"Authorization": f"token {self.token}"})
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body = response.read()
        return json.loads(body) if body else None

    def output_tail(self, chars: int = _OUTPUT_TAIL) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no server output)"
        return text[-chars:]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _lab_environment(home: Path) -> dict[str, str]:
    config = home / "config"
    # Quiet the news and update checks: there is no network, and their toast covers the page.
    notification = config / "lab/user-settings/@jupyterlab/apputils-extension"
    notification.mkdir(parents=True)
    (notification / "notification.jupyterlab-settings").write_text(
        json.dumps({"fetchNews": "false", "checkForUpdates": False}))
    dirs = {
        "JUPYTER_CONFIG_DIR": config,
        "JUPYTER_DATA_DIR": home / "data",
        "JUPYTER_RUNTIME_DIR": home / "runtime",
        "JUPYTERLAB_SETTINGS_DIR": config / "lab/user-settings",
        "JUPYTERLAB_WORKSPACES_DIR": config / "lab/workspaces",
        "IPYTHONDIR": home / "ipython",
    }
    for path in dirs.values():
        path.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **{k: str(v) for k, v in dirs.items()}}
    for variable in ("JUPYTER_PATH", "JUPYTER_CONFIG_PATH", "JUPYTER_TOKEN", "JUPYTER_PORT"):
        env.pop(variable, None)
    env["PYDEVD_DISABLE_FILE_VALIDATION"] = "1"  # the kernel's debugpy warns on frozen modules
    return env


def _lab_argv(root: Path, port: int, token: str) -> list[str]:
    # Containers and CI often run as root, which jupyter refuses without being told.
    root_flag = ["--allow-root"] if hasattr(os, "geteuid") and os.geteuid() == 0 else []
    return [
        sys.executable, "-m", "jupyter", "lab",
        "--no-browser",
        "--ServerApp.ip=127.0.0.1",
        f"--ServerApp.port={port}",
        "--ServerApp.port_retries=0",  # a taken port fails fast; we retry with another
        f"--IdentityProvider.token={token}",
        f"--ServerApp.root_dir={root}",
        # run_notebook_in_lab drives the lab through window.jupyterapp: its commands and models
        # are what the menus use, without the fragility of clicking through them.
        "--LabApp.expose_app_in_browser=True",
        "--LabApp.check_for_updates_class=jupyterlab.handlers.announcements.NeverCheckForUpdate",
        "--ServerApp.terminals_enabled=False",  # no shells to leave behind
        *root_flag,
    ]


def _wait_ready(server: LabServer, deadline: float) -> bool:
    """True once /api/status answers; False if the server exited first (port taken, bad config)."""
    last = "no answer yet"
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            return False
        try:
            server.api("GET", "api/status", timeout=2)
            return True
        except (OSError, ValueError) as e:  # URLError, refused connection, HTTP 5xx, half-JSON
            last = f"{type(e).__name__}: {e}"
        time.sleep(_POLL)  # ok-sleep: polls /api/status, with a deadline
    raise LabTimeout(
        f"jupyter lab (pid {server.pid}, port {server.port}) did not answer /api/status in time;"
        f" last: {last}\n--- server output ---\n{server.output_tail()}")


def _shutdown_kernels(server: LabServer, deadline: float) -> None:
    """Asks the server to shut down its kernels while it can still answer: politer than
    killing them, and it lets the kernels remove their connection files."""
    try:
        kernels = server.api("GET", "api/kernels", timeout=max(0.5, deadline - time.monotonic()))
        for kernel in kernels:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            server.api("DELETE", f"api/kernels/{kernel['id']}", timeout=remaining)
    except (OSError, ValueError):
        pass  # the server is already gone or stuck: the signals and the kill below still come


def _stop(server: LabServer, *, grace: float = 10) -> None:
    """Kernels via the API, then SIGTERM to the server's group, SIGKILL after `grace` seconds;
    then whatever the server started that outlived it (kernels run in their own sessions)."""
    proc = server.process
    try:
        descendants = psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:
        descendants = []
    if proc.poll() is None:
        _shutdown_kernels(server, time.monotonic() + grace)
        with contextlib.suppress(psutil.Error):
            descendants += psutil.Process(proc.pid).children(recursive=True)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=grace)
    # The group may outlive its leader (the server's own helpers): kill it whole in any case.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=grace)
    survivors = {p.pid: p for p in descendants if p.is_running()}.values()
    for p in survivors:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(list(survivors), timeout=grace)


@contextlib.contextmanager
def jupyter_lab(root: Path, *, timeout: float = 60) -> Iterator[LabServer]:
    """Starts `jupyter lab` serving `root` on 127.0.0.1, waits until it answers (at most
    `timeout` seconds), yields a LabServer, and stops it and its kernels on exit."""
    root = Path(root).resolve()
    if not root.is_dir():
        raise LabError(f"jupyter lab root {root} is not a directory")
    home = Path(tempfile.mkdtemp(prefix="hangkit-lab-"))
    deadline = time.monotonic() + timeout
    server = None
    try:
        env = _lab_environment(home)
        for _attempt in range(3):  # another process may take our free port before the server does
            port, token = _free_port(), secrets.token_hex(24)
            log = open(home / "server.log", "wb")  # noqa: SIM115 - closed below, after the server
            try:
                process = subprocess.Popen(
                    _lab_argv(root, port, token), stdin=subprocess.DEVNULL, stdout=log,
                    stderr=subprocess.STDOUT, env=env, cwd=root, start_new_session=True)
            finally:
                log.close()  # the child holds its own descriptor
            server = LabServer(f"http://127.0.0.1:{port}/", token, port, root, home, process)
            if _wait_ready(server, deadline):
                break
            output = server.output_tail()
            if "is not available" not in output and "already in use" not in output:
                raise LabError(
                    f"jupyter lab exited with {process.returncode} before it was ready"
                    f"\n--- server output ---\n{output}")
        else:
            raise LabError(f"jupyter lab found no free port in 3 tries\n{server.output_tail()}")
        yield server
    finally:
        if server is not None:
            _stop(server)
        shutil.rmtree(home, ignore_errors=True)


def have_chromium() -> bool:
    return CHROMIUM.is_file() and os.access(CHROMIUM, os.X_OK)


def lab_root(tmp_path: Path) -> Path:
    """A fresh root for the lab under tmp_path. Skips the test, saying why, only where
    Chromium is not installed (.ci/run installs it)."""
    import pytest

    if not have_chromium():
        pytest.skip("Chromium not installed: apt-get install chromium")
    root = tmp_path / "lab"
    root.mkdir()
    return root


@contextlib.contextmanager
def chromium(*, timeout: float = 30, width: int = 1400, height: int = 1000) -> Iterator[Any]:
    """A Playwright page (sync API) in headless Chromium; `timeout` (seconds) is the page's
    default for each action and wait. Closes the browser and Playwright's driver on exit, and
    waits for Chromium's crash handlers, which outlive it detached from it."""
    from playwright.sync_api import sync_playwright

    if not have_chromium():
        raise LabError(f"Chromium not found at {CHROMIUM}: apt-get install chromium")
    # Chromium keeps its crash database under $XDG_CONFIG_HOME: point it at a directory of ours,
    # which keeps ~/.config clean and names the crash handlers (reparented to init) on exit.
    home = Path(tempfile.mkdtemp(prefix="hangkit-chromium-"))
    env = {**os.environ, "XDG_CONFIG_HOME": str(home / "config"),
           "XDG_CACHE_HOME": str(home / "cache")}
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(
                executable_path=str(CHROMIUM), headless=True, args=list(CHROMIUM_ARGS),
                env=env, timeout=timeout * 1000)
            try:
                context = browser.new_context(viewport={"width": width, "height": height})
                page = context.new_page()
                page.set_default_timeout(timeout * 1000)
                yield page
            finally:
                browser.close()
    finally:
        _reap_mentioning(str(home), grace=10)
        shutil.rmtree(home, ignore_errors=True)


def _reap_mentioning(needle: str, *, grace: float) -> None:
    """Waits up to `grace` seconds for processes whose command line mentions `needle` to exit,
    then kills the rest."""
    def mentioning() -> list[psutil.Process]:
        found = []
        for proc in psutil.process_iter(["cmdline"]):
            if needle in " ".join(proc.info["cmdline"] or []):
                found.append(proc)
        return found

    _gone, alive = psutil.wait_procs(mentioning(), timeout=grace)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(alive, timeout=grace)


def save_screenshot(page: Any, path: Path) -> Path:
    """A PNG of the whole page at `path` (parents created); returns `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(path), full_page=True)
    return path


def save_element_screenshot(locator: Any, path: Path, *, max_height: int = 4000) -> Path:
    """A PNG of one element (a cell's output area, a widget) at `path`; returns `path`.
    Scrolled into view first: JupyterLab paints only the cells in view, and a page screenshot
    of a long notebook is the empty part of its panel. An element taller than the notebook's
    panel would be cut to the part in view, under the toolbar: the page grows to hold it
    whole (up to `max_height` pixels) for the screenshot, and is then put back."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    page, box = locator.page, locator.bounding_box()
    size = dict(page.viewport_size or {})
    # The panel is the page less JupyterLab's menu, toolbar and status bar (~150 px).
    needed = int(box["height"]) + 250 if box else 0
    try:
        if size and needed > size["height"]:
            page.set_viewport_size({"width": size["width"],
                                    "height": min(needed, max_height)})
        locator.scroll_into_view_if_needed()
        locator.screenshot(path=str(path), animations="disabled")
    finally:
        if size and page.viewport_size != size:
            page.set_viewport_size(size)
    return path


def _colours(path: Path):
    """The PNG's pixels as one integer per pixel (RGB, 8 bits each), and its (height, width)."""
    import numpy as np
    from matplotlib.image import imread

    pixels = imread(str(path))  # floats in [0, 1] for a PNG, RGB or RGBA
    rgb = np.rint(np.asarray(pixels)[..., :3] * 255).astype(np.uint32)
    return (rgb[..., 0] << 16 | rgb[..., 1] << 8 | rgb[..., 2]).ravel(), rgb.shape[:2]


def check_shows_something(path: Path, *, others: tuple[Path, ...] = (), min_ink: float = 0.005,
                          min_colours: int = 8) -> None:
    """Raises AssertionError unless the PNG at `path` shows something: at least `min_ink` of
    its pixels differ from its most common colour (the background), in at least
    `min_colours` colours (text is anti-aliased), and its pixels are not those of any of
    `others` (another screenshot that should show something else)."""
    import numpy as np

    colours, shape = _colours(path)
    values, counts = np.unique(colours, return_counts=True)
    ink = 1 - counts.max() / colours.size
    assert ink >= min_ink and len(values) >= min_colours, (
        f"{path}: {shape[1]}x{shape[0]} px is nearly one colour (#{values[counts.argmax()]:06x}"
        f" on {1 - ink:.2%} of it, {len(values)} colours in all)")
    for other in others:
        theirs, their_shape = _colours(other)
        assert their_shape != shape or not np.array_equal(colours, theirs), (
            f"{path} has the same pixels as {other}")


# Reads the notebook opened at `path` from JupyterLab's own models; returns a plain dict.
_STATE_JS = """
([path]) => {
  const app = window.jupyterapp;
  if (!app) return {phase: "loading", app: false};
  if (!app.shell || !app.commands) return {phase: "loading", app: true};
  const panel = Array.from(app.shell.widgets("main")).find(
    w => w.context && w.context.path === path && w.content && w.sessionContext);
  if (!panel) return {phase: "opening", app: true};
  const session = panel.sessionContext;
  const kernel = session.session && session.session.kernel;
  const cells = [];
  for (const cell of panel.content.widgets) {
    const m = cell.model;
    if (m.type !== "code") continue;
    const outputs = m.outputs.toJSON();
    const error = outputs.find(o => o.output_type === "error");
    cells.push({count: m.executionCount,
                error: error ? {ename: error.ename, evalue: error.evalue,
                                traceback: error.traceback} : null});
  }
  const dialog = document.querySelector(".jp-Dialog");
  return {
    phase: "open",
    contextReady: panel.context.isReady,
    sessionReady: session.isReady,
    kernelName: kernel ? kernel.name : null,
    kernel: kernel ? kernel.status : null,
    connection: kernel ? kernel.connectionStatus : null,
    dialog: dialog ? dialog.innerText.slice(0, 300) : null,
    cells: cells,
    run: window.__hangkitRun || null,
  };
}
"""

# Runs every cell of the notebook at `path`; the outcome lands in window.__hangkitRun.
_RUN_ALL_JS = """
([path]) => {
  const app = window.jupyterapp;
  const panel = Array.from(app.shell.widgets("main")).find(
    w => w.context && w.context.path === path && w.content && w.sessionContext);
  app.shell.activateById(panel.id);
  window.__hangkitRun = {done: false};
  app.commands.execute("notebook:run-all-cells").then(
    ok => { window.__hangkitRun = {done: true, ok: ok}; },
    e => { window.__hangkitRun = {done: true, ok: false, error: String(e)}; });
}
"""


def _describe(state: dict | None) -> str:
    if not state:
        return "no state read from the page"
    if state.get("phase") != "open":
        return f"phase {state.get('phase')} (window.jupyterapp present: {state.get('app')})"
    counts = [c["count"] for c in state["cells"]]
    text = (f"kernel {state['kernelName']} status {state['kernel']} ({state['connection']}),"
            f" session ready {state['sessionReady']}, execution counts {counts},"
            f" run-all {state['run']}")
    if state.get("dialog"):
        text += f", dialog open: {state['dialog']!r}"
    return text


def run_notebook_in_lab(page: Any, server: LabServer, notebook_rel_path: str, *,
                        timeout: float = 180, screenshot: Path | None = None) -> None:
    """Opens the notebook at `notebook_rel_path` (relative to the server's root) in JupyterLab,
    waits for its kernel to be idle, runs all cells and waits until they have run and the kernel
    is idle again, all within `timeout` seconds. Raises NotebookError if a cell raised, and
    LabTimeout (after saving a screenshot to `screenshot`, by default next to the notebook)
    if the deadline passes."""
    from playwright.sync_api import Error as PlaywrightError

    path = Path(notebook_rel_path).as_posix()
    screenshot = screenshot or server.root / (Path(path).stem + "-lab-timeout.png")
    deadline = time.monotonic() + timeout
    console: list[str] = []

    def on_console(message: Any) -> None:
        if message.type in ("error", "warning"):
            console.append(f"{message.type}: {message.text}"[:300])

    def remaining_ms() -> float:
        return max(1.0, (deadline - time.monotonic()) * 1000)

    def fail(what: str, state: dict | None) -> LabTimeout:
        try:
            shot = f"screenshot: {save_screenshot(page, screenshot)}"
        except Exception as e:  # the page may be the thing that is broken
            shot = f"no screenshot ({type(e).__name__}: {e})"
        return LabTimeout(
            f"{what} within {timeout:g} s for {path}: {_describe(state)}; {shot}"
            f"\n--- browser console (last errors) ---\n" + "\n".join(console[-10:]) +
            f"\n--- server output ---\n{server.output_tail(2000)}")

    def wait_for(what: str, done: Any) -> dict:
        state = None
        while time.monotonic() < deadline:
            if server.process.poll() is not None:
                raise LabError(f"jupyter lab exited with {server.process.returncode} while"
                               f" waiting for {what}\n{server.output_tail()}")
            try:
                state = page.evaluate(_STATE_JS, [path])
            except PlaywrightError as e:  # a navigation replaced the page under us: look again
                state = {"phase": f"unreadable ({str(e).splitlines()[0]})", "app": None}
            if done(state):
                return state
            _accept_kernel_dialog(page, state)
            page.wait_for_timeout(_POLL * 1000)
        raise fail(f"no {what}", state)

    page.on("console", on_console)
    try:
        try:
            page.goto(server.lab_url(path), wait_until="domcontentloaded", timeout=remaining_ms())
        except PlaywrightError as e:
            raise fail(f"no page ({str(e).splitlines()[0]})", None) from e
        wait_for("idle kernel", lambda s: s.get("phase") == "open" and s["sessionReady"]
                 and s["kernel"] == "idle" and s["connection"] == "connected")
        page.evaluate(_RUN_ALL_JS, [path])
        state = wait_for("finished run", _run_finished)
    finally:
        page.remove_listener("console", on_console)
    errors = [c["error"] for c in state["cells"] if c["error"]]
    if errors:
        first = errors[0]
        trace = _ANSI.sub("", "\n".join(first["traceback"] or []))
        raise NotebookError(f"{path}: a cell raised {first['ename']}: {first['evalue']}\n{trace}")
    if not state["run"].get("ok"):
        raise NotebookError(f"{path}: run-all did not succeed: {state['run']}")


def _run_finished(state: dict) -> bool:
    if state.get("phase") != "open" or not (state["run"] or {}).get("done"):
        return False
    if state["kernel"] != "idle":
        return False
    # A failed cell stops the run: the cells after it keep no count, and that is finished too.
    return (all(c["count"] is not None for c in state["cells"])
            or any(c["error"] for c in state["cells"]) or not state["run"].get("ok"))


def _accept_kernel_dialog(page: Any, state: dict) -> None:
    """A notebook without kernel metadata asks which kernel to start: take the default."""
    dialog = state.get("dialog") if state.get("phase") == "open" else None
    if dialog and "select kernel" in dialog.lower():
        with contextlib.suppress(Exception):
            page.locator(".jp-Dialog .jp-mod-accept").first.click(timeout=2000)
