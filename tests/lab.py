"""A JupyterLab server and a headless Chromium page, for end-to-end notebook tests.

``lab_server(root, state)`` starts ``python -m jupyterlab`` on a free localhost port with an empty
token, serving ``root``; its settings, workspaces, runtime and data files and its log go under
``state``. ``open_browser()`` launches Debian's Chromium
(``apt-get install chromium chromium-driver``) through Playwright, never a downloaded browser.
The page helpers drive the notebook through ``window.jupyterapp`` (exposed by
``--LabApp.expose_app_in_browser``) and read plotly figures through their DOM elements.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from playwright.sync_api import Browser, ConsoleMessage, Locator, Page, sync_playwright

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = (
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)
# Attach every cell (no windowing, so offscreen plots get laid out) and show no news toasts.
LAB_SETTINGS = {
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {
        "fetchNews": "false",
        "checkForUpdates": False,
        "doNotDisturbMode": True,
    },
}
WIDGET_ERROR = "Error displaying widget"

T = TypeVar("T")


def wait_until(check: Callable[[], T], timeout: float, what: str, interval: float = 0.5) -> T:
    """Call ``check`` until it returns something true, and return that; TimeoutError names ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        if result := check():
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout:.0f} s for {what}")
        time.sleep(interval)


def free_port() -> int:
    """A localhost TCP port that was free a moment ago (the OS picks it when binding to port 0)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class LabServer:
    """A running JupyterLab: its base ``url`` (ending in "/") and the file holding its output."""

    url: str
    log_path: Path

    def log(self) -> str:
        """Everything the server (and its kernels) printed so far."""
        return self.log_path.read_text(errors="replace")


@contextmanager
def lab_server(root: Path, state: Path, timeout: float = 60) -> Iterator[LabServer]:
    """Run JupyterLab on ``root`` until the block ends; then stop it and every kernel it started.

    The server runs in its own process group: SIGTERM lets it shut its kernels down, and SIGKILL to
    the group afterwards removes anything left. Raises RuntimeError (with the log) if the server
    exits early, TimeoutError if ``/api/status`` does not answer within ``timeout`` seconds.
    """
    settings, workspaces, runtime, config, data = (state / name for name in ("settings", "workspaces", "runtime", "config", "data"))
    for name, values in LAB_SETTINGS.items():
        (settings / name).parent.mkdir(parents=True, exist_ok=True)
        (settings / name).write_text(json.dumps(values))
    for directory in (workspaces, runtime, config, data):
        directory.mkdir(parents=True, exist_ok=True)
    port = free_port()
    command = [
        sys.executable, "-m", "jupyterlab", "--no-browser", "--allow-root",
        "--ip=127.0.0.1", f"--port={port}", "--ServerApp.port_retries=0",
        "--IdentityProvider.token=", f"--ServerApp.root_dir={root}",
        "--LabApp.expose_app_in_browser=True",
        f"--LabApp.user_settings_dir={settings}", f"--LabApp.workspaces_dir={workspaces}",
    ]  # fmt: skip
    env = {**os.environ, "JUPYTER_RUNTIME_DIR": str(runtime), "JUPYTER_CONFIG_DIR": str(config), "JUPYTER_DATA_DIR": str(data)}
    log_path = state / "server.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            command, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
    server = LabServer(f"http://127.0.0.1:{port}/", log_path)
    try:
        wait_until(lambda: _answers(server, process), timeout, f"JupyterLab on port {port}")
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait()


def _answers(server: LabServer, process: subprocess.Popen) -> bool:
    """True once ``/api/status`` answers; RuntimeError with the log if the server has exited."""
    if process.poll() is not None:
        raise RuntimeError(f"JupyterLab exited with code {process.returncode}:\n{server.log()}")
    try:
        with urllib.request.urlopen(server.url + "api/status", timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


@dataclass
class BrowserLog:
    """What the page printed to its console and the errors it raised, in order."""

    lines: list[str] = field(default_factory=list)

    def console(self, message: ConsoleMessage) -> None:
        self.lines.append(f"[{message.type}] {message.text}")

    def error(self, error: Exception) -> None:
        self.lines.append(f"[pageerror] {error}")

    def __str__(self) -> str:
        return "\n".join(self.lines) or "(nothing)"


@contextmanager
def open_browser() -> Iterator[Browser]:
    """Headless Debian Chromium under Playwright; FileNotFoundError says how to install it."""
    if not CHROMIUM.exists():
        raise FileNotFoundError(f"{CHROMIUM} is missing: apt-get install -y chromium chromium-driver (make test does)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=list(CHROMIUM_ARGS))
        try:
            yield browser
        finally:
            browser.close()


# JavaScript run in the page; `jupyterapp.shell.currentWidget` is the open notebook panel.
_KERNEL_STATUS = """() => {
    const panel = window.jupyterapp?.shell?.currentWidget;
    return panel?.sessionContext?.session?.kernel?.status ?? null;
}"""
_NOTEBOOK_STATE = """() => {
    const panel = window.jupyterapp.shell.currentWidget;
    const state = {kernel: panel.sessionContext.session?.kernel?.status ?? 'none', pending: 0, errors: []};
    const cells = panel.content.model.cells;
    for (let i = 0; i < cells.length; i++) {
        const cell = cells.get(i);
        if (cell.type !== 'code') continue;
        if (cell.executionCount === null) state.pending++;
        for (let j = 0; j < cell.outputs.length; j++) {
            const output = cell.outputs.get(j).toJSON();
            if (output.output_type === 'error') state.errors.push(`cell ${i}: ${output.ename}: ${output.evalue}`);
        }
    }
    state.running = [...panel.content.node.querySelectorAll('.jp-InputPrompt')]
        .filter(prompt => prompt.textContent.includes('[*]')).length;
    return state;
}"""
_CELL_WITH_SOURCE = """(text) => {
    const cells = window.jupyterapp.shell.currentWidget.content.model.cells;
    for (let i = 0; i < cells.length; i++) {
        if (cells.get(i).type === 'code' && cells.get(i).sharedModel.getSource().includes(text)) return i;
    }
    return -1;
}"""
_RUN_CELL = """(index) => {
    const panel = window.jupyterapp.shell.currentWidget;
    panel.content.activeCellIndex = index;
    window.jupyterapp.commands.execute('notebook:run-cell');
}"""
_PLOT_POINTS = "el => (el.data || []).map(trace => (trace.x || []).length)"


def open_notebook(page: Page, server: LabServer, name: str, timeout: float = 60) -> None:
    """Open notebook ``name`` (relative to the server's root) and wait until its kernel is idle."""
    page.goto(f"{server.url}lab/tree/{name}")
    wait_until(lambda: page.evaluate(_KERNEL_STATUS) == "idle", timeout, f"{name} to open with an idle kernel")


def notebook_state(page: Page) -> dict:
    """The kernel's status, the number of code cells never run and of cells showing [*], and every error output."""
    return page.evaluate(_NOTEBOOK_STATE)


def run_all_cells(page: Page, timeout: float = 120) -> None:
    """Run every cell and wait until each code cell has run and the kernel is idle.

    Raises AssertionError naming the cells that raised, as soon as one does.
    """
    page.evaluate("() => { window.jupyterapp.commands.execute('notebook:run-all-cells'); }")
    wait_until(lambda: _finished(page), timeout, "all cells to run (state: kernel, pending, running)")


def run_cell_with(page: Page, text: str, timeout: float = 60) -> Locator:
    """Re-run the first code cell whose source contains ``text``; returns its DOM cell once the kernel is idle."""
    index = page.evaluate(_CELL_WITH_SOURCE, text)
    assert index >= 0, f"no cell of the notebook contains {text!r}"
    before = page.evaluate("(i) => window.jupyterapp.shell.currentWidget.content.model.cells.get(i).executionCount", index)
    page.evaluate(_RUN_CELL, index)
    count = f"window.jupyterapp.shell.currentWidget.content.model.cells.get({index}).executionCount"
    wait_until(lambda: page.evaluate(count) not in (None, before) and _finished(page), timeout, f"the cell with {text!r} to run")
    return page.locator(".jp-Notebook .jp-Cell").nth(index)


def _finished(page: Page) -> bool:
    state = notebook_state(page)
    assert not state["errors"], "cells raised:\n" + "\n".join(state["errors"])
    return state["kernel"] == "idle" and state["pending"] == 0 and state["running"] == 0


def plot_points(plots: Locator) -> list[int]:
    """The number of x values of every trace of every plotly plot in ``plots`` (``.js-plotly-plot`` elements)."""
    return [n for i in range(plots.count()) for n in plots.nth(i).evaluate(_PLOT_POINTS)]
