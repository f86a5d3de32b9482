"""Execute notebooks in place and store them with their outputs.

Usage (from the repository's root)::

    .venv/bin/python notebooks/execute.py notebooks/0*.ipynb

Each notebook runs top to bottom in a fresh ``python3`` kernel whose working directory is the
notebook's own folder (as under ``pytest --nbval-lax``), then is written back with its outputs.
Widget state (``metadata.widgets``, megabytes per figure widget) and per-cell timestamps are
dropped and the kernelspec is set to the project's ``python3`` kernel, so the stored files stay
small, open anywhere and change only where an output changes.
A cell that raises stops the run and leaves that notebook's file untouched.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

KERNEL = "python3"
KERNELSPEC = {"name": KERNEL, "display_name": "Python 3 (ipykernel)", "language": "python"}
TIMEOUT = 600  # seconds per cell


def execute(path: Path, timeout: int = TIMEOUT) -> float:
    """Run the notebook at ``path`` in its own folder and overwrite it with its outputs; returns seconds taken."""
    notebook = nbformat.read(path, as_version=4)
    start = time.perf_counter()
    NotebookClient(notebook, timeout=timeout, kernel_name=KERNEL, record_timing=False,
                   resources={"metadata": {"path": str(path.parent.resolve())}}).execute()
    seconds = time.perf_counter() - start
    notebook.metadata.pop("widgets", None)
    for cell in notebook.cells:
        cell.metadata.pop("execution", None)
    notebook.metadata["kernelspec"] = dict(KERNELSPEC)
    nbformat.validate(notebook)
    nbformat.write(notebook, path)
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Execute notebooks in place and store them with outputs.")
    parser.add_argument("notebooks", nargs="+", type=Path, help="the .ipynb files to execute")
    parser.add_argument("--timeout", type=int, default=TIMEOUT, help=f"seconds per cell (default {TIMEOUT})")
    args = parser.parse_args(argv)
    for path in args.notebooks:
        if path.suffix != ".ipynb" or not path.is_file():
            parser.error(f"{path} is not a notebook file (.ipynb)")
    for path in args.notebooks:
        seconds = execute(path, args.timeout)
        print(f"{path}: executed in {seconds:.1f} s, {path.stat().st_size / 1024:,.0f} KB stored")
    return 0


if __name__ == "__main__":
    sys.exit(main())
