"""The example notebooks as stored: executed, with outputs, no errors, no widget state, the project's kernel.

nbval (``--nbval-lax``) runs every notebook; these tests check the files themselves, which is
what a reader sees on GitHub or opens in JupyterLab: ``notebooks/execute.py`` writes them so.
"""

import json
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))
MAX_BYTES = 1_000_000  # plotly.js or widget state embedded by mistake is several MB


def read(path: Path) -> dict:
    return json.loads(path.read_text())


def code_cells(notebook: dict) -> list[dict]:
    return [cell for cell in notebook["cells"] if cell["cell_type"] == "code"]


@pytest.fixture(params=NOTEBOOKS, ids=[path.name for path in NOTEBOOKS])
def notebook_path(request) -> Path:
    return request.param


def test_there_are_notebooks():
    assert NOTEBOOKS, "notebooks/ holds no .ipynb file"


def test_kernelspec_is_python3(notebook_path):
    kernelspec = read(notebook_path)["metadata"].get("kernelspec", {})
    assert kernelspec.get("name") == "python3", f"{notebook_path.name}: kernelspec {kernelspec!r}"
    assert kernelspec.get("language") == "python"


def test_no_widget_state(notebook_path):
    assert "widgets" not in read(notebook_path)["metadata"], (
        f"{notebook_path.name} stores widget state (metadata.widgets): store it with notebooks/execute.py"
    )


def test_stored_with_outputs(notebook_path):
    cells = code_cells(read(notebook_path))
    assert cells, f"{notebook_path.name} has no code cell"
    unexecuted = [index for index, cell in enumerate(cells) if cell.get("execution_count") is None]
    assert not unexecuted, f"{notebook_path.name}: code cells {unexecuted} were not executed"
    counts = [cell["execution_count"] for cell in cells]
    assert counts == list(range(1, len(cells) + 1)), f"{notebook_path.name}: not run top to bottom once: {counts}"


def test_no_error_outputs(notebook_path):
    errors = [f"cell {index}: {output.get('ename')}: {output.get('evalue')}"
              for index, cell in enumerate(code_cells(read(notebook_path)))
              for output in cell.get("outputs", []) if output["output_type"] == "error"]
    assert not errors, f"{notebook_path.name} stores errors: {errors}"


def test_stored_file_is_small(notebook_path):
    size = notebook_path.stat().st_size
    assert size < MAX_BYTES, f"{notebook_path.name} is {size:,} bytes; embedded plotly.js or widget state?"
