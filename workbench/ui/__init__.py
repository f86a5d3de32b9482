"""Notebook panels: ipywidgets 8 and plotly FigureWidgets over the public API.

The only package that imports ipywidgets; ``import workbench`` does not load it until
``wb.ui`` is first used. Every panel calls the same functions as the CLI and writes the same
run directories.
"""

from .browser import CheckpointBrowser
from .compare import Compare
from .workbench import Workbench

__all__ = ["CheckpointBrowser", "Compare", "Workbench"]
