"""What every panel shares: display through its top-level widget, the status line, HTML tables, figure redraws,
rows that wrap, the export into a typed directory."""

from __future__ import annotations

import html
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import ipywidgets as widgets
import pandas as pd
import plotly.graph_objects as go

import workbench as wb

BEST_STYLE = "background:#ffe066;font-weight:bold"


STATIC_NOTE = "A picture of the panel as it was; run the cell for the live panel."


class Panel:
    """A panel is shown as its top-level ``widget`` (a cell ending with the panel displays it).

    Beside the widget view its display carries a static picture (``static_html``) as text/html and
    a one-line text/plain: what a notebook opened without its kernel or widget state shows (a
    stored notebook, GitHub, nbviewer) instead of the widget's repr.
    """

    widget: widgets.Widget

    def _repr_mimebundle_(self, **kwargs: Any) -> dict[str, Any] | None:
        bundle = self.widget._repr_mimebundle_(**kwargs) or {}
        picture = (f'<div style="border:1px solid #ddd;padding:6px;font-size:13px">{static_html(self.widget)}'
                   f'<div style="color:#777;font-size:11px">{html.escape(STATIC_NOTE)}</div></div>')
        return {**bundle, "text/html": picture, "text/plain": f"{type(self).__name__} panel. {STATIC_NOTE}"}


def _value_text(widget: widgets.Widget) -> str:
    """What a control shows: the chosen label(s) of a selection, else its value."""
    if isinstance(widget, widgets.widget_selection._MultipleSelection):
        return ", ".join(map(str, widget.label)) or "none"
    if isinstance(widget, widgets.widget_selection._Selection):
        return str(widget.label)
    if isinstance(widget, widgets.Checkbox):
        return "yes" if widget.value else "no"
    if isinstance(widget, widgets.IntProgress):
        return f"{widget.value} / {widget.max}"
    return str(widget.value)


def static_html(widget: widgets.Widget) -> str:
    """A widget tree as plain HTML, no script: containers as rows or columns, HTML widgets as they are,
    buttons as disabled buttons, each control as "description: value"; a figure is named by its
    title, not drawn (its points need plotly.js). Hidden widgets (``layout.display == "none"``) are left out."""
    if isinstance(widget, go.FigureWidget):  # its layout is plotly's
        title = html.escape(widget.layout.title.text or "figure")
        return f'<div style="border:1px dashed #bbb;padding:1em;color:#555">{title} (drawn when the cell runs)</div>'
    if widget.layout.display == "none":
        return ""
    if isinstance(widget, widgets.Box):
        flow = "column" if isinstance(widget, widgets.VBox) else "row wrap"
        parts = "".join(static_html(child) for child in widget.children)
        return f'<div style="display:flex;flex-flow:{flow};gap:4px 14px;margin:2px 0">{parts}</div>'
    if isinstance(widget, widgets.HTML):
        return f"<div>{widget.value}</div>"
    if isinstance(widget, widgets.Button):
        return f"<button disabled>{html.escape(widget.description)}</button>"
    if isinstance(widget, widgets.ValueWidget):
        label = f"{html.escape(widget.description)}: " if getattr(widget, "description", "") else ""
        return f"<span>{label}<b>{html.escape(_value_text(widget))}</b></span>"
    return ""


def row(*children: widgets.Widget) -> widgets.Box:
    """Controls side by side that wrap onto the next line in a narrow notebook (~750 px) instead of overlapping."""
    return widgets.Box(list(children), layout=widgets.Layout(flex_flow="row wrap", align_items="flex-start"))


def export_typed(checkpoint: Path, box: widgets.Text, to: str | os.PathLike[str] | None, format: str,
                 task: wb.Task | None = None) -> tuple[Path, str]:
    """``wb.export_checkpoint`` of ``checkpoint`` in ``format`` into ``to`` (then shown in ``box``), else into
    the directory typed in ``box``; returns the directory and a status line naming its files and any
    warning the export gave (delta-lora's moved weights, say).

    Raises:
        ValueError: no directory given, or as ``wb.export_checkpoint``.
    """
    if to is not None:
        box.value = str(to)
    typed = box.value.strip()
    if not typed:
        raise ValueError(f"type the directory to export to in the '{box.description}' box")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = wb.export_checkpoint(checkpoint, Path(typed).expanduser(), format, task=task)
    notes = "".join(f" Note: {w.message}" for w in caught)
    files = ", ".join(sorted(file.name for file in out.iterdir()))
    return out, f"exported {checkpoint.name} of {checkpoint.parent.parent.name} ({format}) to {out}: {files}.{notes}"


def show(status: widgets.HTML, message: str, error: bool = False) -> None:
    """Put ``message`` (plain text) in a panel's status line; errors in red."""
    color = "#c92a2a" if error else "#2b8a3e"
    status.value = f'<span style="color:{color}">{html.escape(message)}</span>'


def catching(status: widgets.HTML, action: Callable[[], Any],
             failed: Callable[[str], Any] | None = None) -> Callable[[Any], None]:
    """A widget callback that runs ``action`` and shows any exception in ``status``.

    ipywidgets only logs an exception raised in a click handler (the user sees nothing), so
    every handler of the panels goes through this. ``failed``, if given, is also called with
    the message shown ("<ExceptionType>: <text>"), e.g. to keep it in an attribute.
    """

    def handler(_: Any) -> None:
        try:
            action()
        except Exception as error:  # any failure belongs in the status line, not in a log
            message = f"{type(error).__name__}: {error}"
            if failed is not None:
                failed(message)
            show(status, message, error=True)

    return handler


def redraw(widget: go.FigureWidget, figure: go.Figure) -> None:
    """Make ``widget`` show ``figure``'s traces and layout, in place (the widget on screen stays, and redraws once)."""
    with widget.batch_update():
        widget.data = ()
        widget.add_traces(list(figure.data))
        widget.update_layout(figure.layout.to_plotly_json(), overwrite=True)


def _cell(value: Any, column: str) -> str:
    if value is None or (isinstance(value, float) and value != value):
        return ""
    if column == "size":
        return f"{value / 1024:.1f} KB"
    if isinstance(value, float):
        return f"{value:.4g}"
    return html.escape(str(value))


def html_table(frame: pd.DataFrame, columns: Sequence[str], row_style: Callable[[pd.Series], str] = lambda _: "",
               key: str | None = None) -> str:
    """An HTML table of ``frame``'s ``columns``, each row styled by ``row_style(row)``.

    With ``key``, each ``<tr>`` carries ``data-key="<row[key]>"`` so a row can be found again.
    """
    head = "".join(f'<th style="padding:2px 8px;text-align:left">{html.escape(c)}</th>' for c in columns)
    rows = []
    for _, row in frame.iterrows():
        attributes = f' data-key="{html.escape(str(row[key]))}"' if key else ""
        cells = "".join(f'<td style="padding:2px 8px">{_cell(row[c], c)}</td>' for c in columns)
        rows.append(f'<tr style="{row_style(row)}"{attributes}>{cells}</tr>')
    return ('<div style="max-height:320px;overflow:auto"><table style="border-collapse:collapse;font-size:12px">'
            f"<thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table></div>")
