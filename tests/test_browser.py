"""End to end in a real browser: the quickstart notebook in JupyterLab, under headless Chromium.

Runs every cell of ``notebooks/01-quickstart.ipynb`` (copied, outputs cleared, into a temporary
directory served by a fresh JupyterLab) and checks that the widgets and plotly figures render. In
the panel with the Launch button it sets a new seed and a long run, clicks Launch, waits for new
points in the panel's figure and new checkpoints on disk, and clicks Stop; then it re-runs the
CheckpointBrowser cell and waits for it to list the new run. Screenshots go to pytest's
``tmp_path``; the README's two (``README_IMAGES``) also go to the directory named by the
environment variable WORKBENCH_SCREENSHOTS when it is set.
Needs ``/usr/bin/chromium`` (``make test`` installs it with apt-get).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from lab import (
    WIDGET_ERROR,
    BrowserLog,
    LabServer,
    lab_server,
    notebook_state,
    open_browser,
    open_notebook,
    plot_points,
    run_all_cells,
    run_cell_with,
    wait_until,
)
from playwright.sync_api import Locator, Page, expect

NOTEBOOK = Path(__file__).parents[1] / "notebooks" / "01-quickstart.ipynb"
README_IMAGES = {"panel": "workbench.png", "browser": "checkpoint-browser.png"}
CHECKPOINTS = "runs/**/checkpoints/step-*"  # relative to the notebook: every checkpoint of every run
LONG_RUN = 3000  # steps: Launch trains that long, so the test sees it training, then stops it


def fresh_copy(notebook: dict) -> dict:
    """``notebook`` without outputs, execution counts or saved widget state, so nothing stale renders."""
    assert notebook["metadata"].get("kernelspec"), "the notebook has no metadata.kernelspec: JupyterLab would ask for a kernel"
    notebook["metadata"].pop("widgets", None)
    for cell in notebook["cells"]:
        if cell["cell_type"] == "code":
            cell["outputs"], cell["execution_count"] = [], None
    return notebook


@pytest.fixture
def server(tmp_path: Path) -> Iterator[LabServer]:
    """JupyterLab serving ``tmp_path/lab``, which holds a fresh copy of the notebook under test."""
    root = tmp_path / "lab"
    root.mkdir()
    notebook = json.loads(NOTEBOOK.read_text())
    (root / NOTEBOOK.name).write_text(json.dumps(fresh_copy(notebook)))
    with lab_server(root, tmp_path / "server") as lab:
        yield lab


@pytest.fixture
def page(server: LabServer) -> Iterator[tuple[Page, BrowserLog]]:
    """A Chromium page, and the log of its console and errors."""
    log = BrowserLog()
    with open_browser() as browser:
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.set_default_timeout(30_000)
        page.on("console", log.console)
        page.on("pageerror", log.error)
        yield page, log


@contextmanager
def explained_failures(page: Page, log: BrowserLog, server: LabServer, tmp_path: Path) -> Iterator[None]:
    """Re-raise any failure as an AssertionError carrying the cells' outputs, the browser console and the server log."""
    try:
        yield
    except Exception as error:
        shot = tmp_path / "failure.png"
        try:
            page.screenshot(path=shot, full_page=True)
            outputs = "\n".join(text[:600] for text in page.locator(".jp-OutputArea-output").all_inner_texts())
        except Exception as page_error:  # the page may be gone; the rest of the report still helps
            shot, outputs = f"(none: {page_error})", "(unreadable)"
        raise AssertionError(
            f"{type(error).__name__}: {error}\n--- screenshot: {shot}\n--- cell outputs ---\n{outputs}\n"
            f"--- browser console ---\n{log}\n--- JupyterLab log ---\n{server.log()[-20_000:]}"
        ) from error


def save_screenshot(element: Locator, name: str, tmp_path: Path) -> None:
    """Screenshot ``element`` into ``tmp_path/name``; a README image also into $WORKBENCH_SCREENSHOTS if set."""
    element.screenshot(path=tmp_path / name, animations="disabled")
    if (directory := os.environ.get("WORKBENCH_SCREENSHOTS")) and name in README_IMAGES.values():
        Path(directory).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(tmp_path / name, Path(directory) / name)


def test_quickstart_runs_and_trains_in_the_browser(page: tuple[Page, BrowserLog], server: LabServer, tmp_path: Path) -> None:
    with explained_failures(*page, server, tmp_path):
        run_quickstart(page[0], server, tmp_path / "lab", tmp_path)


def run_quickstart(page: Page, server: LabServer, root: Path, tmp_path: Path) -> None:
    """Run all cells; in the first panel with a Launch button, choose a new seed and a long run and
    launch it; wait for new points in its plot and new checkpoints on disk; press Stop; re-run the
    CheckpointBrowser cell and wait for it to list the new run."""
    open_notebook(page, server, NOTEBOOK.name)
    run_all_cells(page)
    notebook = page.locator(".jp-NotebookPanel")
    notebook.locator(".jupyter-widgets").first.wait_for(state="attached")  # TimeoutError: no widget rendered
    notebook.locator(".js-plotly-plot").first.wait_for(state="attached")  # TimeoutError: no plotly plot rendered
    assert notebook.get_by_text(WIDGET_ERROR).count() == 0, f"a widget failed: {notebook.get_by_text(WIDGET_ERROR).first.inner_text()}"
    save_screenshot(notebook, "notebook.png", tmp_path)

    launch, stop = (page.locator("button.jupyter-button", has_text=re.compile(rf"^\s*{name}\s*$")) for name in ("Launch", "Stop"))  # fmt: skip
    panel = notebook.locator(".jp-OutputArea-output").filter(has=launch).first
    plots = panel.locator(".js-plotly-plot")
    assert plots.count() > 0, "the panel with the Launch button holds no plotly plot"
    # The notebook may have trained the panel's settings in code already: a new seed makes a new run,
    # long enough to be caught training (it is stopped below).
    seed = panel.get_by_label("seed", exact=True)
    set_number(seed, int(seed.input_value()) + 1)
    set_number(panel.get_by_label("steps", exact=True), LONG_RUN)
    points, saved = plot_points(plots), set(root.glob(CHECKPOINTS))
    panel.locator(launch).click()

    wait_until(lambda: (now := plot_points(plots)) != points and sum(now) > 0, 90, f"new points in the panel's plot after Launch (had {points})")
    new = wait_until(lambda: len(found := sorted(set(root.glob(CHECKPOINTS)) - saved)) >= 3 and found, 90, f"3 new checkpoints ({CHECKPOINTS}) after Launch")
    page.mouse.move(0, 0)  # no hover effects (plotly's mode bar) in the screenshot
    save_screenshot(panel, README_IMAGES["panel"], tmp_path)
    panel.locator(stop).click()
    expect(panel.locator(launch)).to_be_enabled(timeout=60_000)  # the run has ended

    run = new[0].parent.parent.name
    browser = run_cell_with(page, "CheckpointBrowser").locator(".jp-OutputArea-output").filter(has=page.locator(".jupyter-widgets")).last
    wait_until(lambda: run in browser.inner_text(), 30, f"the re-run CheckpointBrowser to list run {run}")
    save_screenshot(browser, README_IMAGES["browser"], tmp_path)

    assert notebook.get_by_text(WIDGET_ERROR).count() == 0, "a widget failed after Launch"
    assert not notebook_state(page)["errors"], f"cells raised: {notebook_state(page)['errors']}"
    check_narrow_layout(page, panel, tmp_path, "panel-750px.png")
    check_narrow_layout(page, browser, tmp_path, "browser-750px.png")


NARROW = 750  # px: the width of a notebook's output area beside an open sidebar on a laptop


def check_narrow_layout(page: Page, panel: Locator, tmp_path: Path, screenshot: str) -> None:
    """Narrow the page until the panel is about ``NARROW`` px wide: no visible input, select, button or
    text box may overlap another or stick out of the panel (bounding boxes), no button's text may be
    cut; save a screenshot."""
    size = page.viewport_size
    for _ in range(3):  # the panel's width follows the page's, less JupyterLab's own margins
        width = panel.bounding_box()["width"]
        page.set_viewport_size({"width": int(size["width"] + NARROW - width), "height": size["height"]})
        size = page.viewport_size
        page.wait_for_timeout(300)  # let the layout settle
    panel_box = panel.bounding_box()
    assert abs(panel_box["width"] - NARROW) < 40, panel_box
    controls = panel.locator("input, select, button:not(.modebar-btn), textarea").all()  # not plotly's own bar
    boxes = [(control.evaluate("e => e.outerHTML.slice(0, 80)"), box) for control in controls
             if control.is_visible() and (box := control.bounding_box()) and box["width"] > 0 and box["height"] > 0]
    assert len(boxes) > 10, boxes  # the panel's controls were found

    def overlap(a: dict, b: dict) -> bool:
        return (min(a["x"] + a["width"], b["x"] + b["width"]) - max(a["x"], b["x"]) > 1
                and min(a["y"] + a["height"], b["y"] + b["height"]) - max(a["y"], b["y"]) > 1)

    overlapping = [(one, other) for i, (one, a) in enumerate(boxes) for other, b in boxes[i + 1:] if overlap(a, b)]
    assert not overlapping, overlapping
    outside = [name for name, box in boxes if box["x"] + box["width"] > panel_box["x"] + panel_box["width"] + 1]
    assert not outside, outside
    cut = [control.inner_text() for control in panel.locator("button.jupyter-button").all()
           if control.is_visible() and control.evaluate("e => e.scrollWidth > e.clientWidth + 1")]
    assert not cut, f"buttons whose text is cut: {cut}"
    save_screenshot(panel, screenshot, tmp_path)


def set_number(field: Locator, value: int) -> None:
    """Type ``value`` into a number widget and leave it: ipywidgets sends the value to the kernel on change."""
    field.fill(str(value))
    field.press("Tab")


def test_the_reports_tables_sort_by_a_clicked_column(tmp_path: Path) -> None:
    import workbench as wb

    runs = tmp_path / "runs"
    wb.sweep("digits", ["lora", "vera"], [1, 4], 4, runs, eval_every=2, save_every=2, progress_bar=False)
    report = wb.write_report(runs, tmp_path / "report.html")
    table = wb.load_runs(runs)
    with open_browser() as browser:
        page = browser.new_page(viewport={"width": 1100, "height": 900})
        page.goto(report.as_uri())
        section = page.locator("section", has=page.locator("h2", has_text=re.compile(r"^Runs$")))
        header = section.locator("th", has_text="trainable parameters")
        column = [th.inner_text() for th in section.locator("th").all()].index("trainable parameters")

        def shown() -> list[int]:
            return [int(row.locator("td").nth(column).inner_text().replace(",", ""))
                    for row in section.locator("tbody tr").all()]

        names = [row.locator("td").first.inner_text() for row in section.locator("tbody tr").all()]
        assert names == list(table.sort_values("best_value", kind="stable")["run"])  # at first: best first
        header.click()
        assert shown() == sorted(table["trainable"])
        header.click()
        assert shown() == sorted(table["trainable"], reverse=True)
        page.screenshot(path=tmp_path / "report.png", full_page=True)
