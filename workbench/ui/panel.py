"""What every panel shares: display through its top-level widget, the status line, HTML tables, figure redraws."""

from __future__ import annotations

import html
from collections.abc import Callable, Sequence
from typing import Any

import ipywidgets as widgets
import pandas as pd
import plotly.graph_objects as go

BEST_STYLE = "background:#ffe066;font-weight:bold"


class Panel:
    """A panel is shown as its top-level ``widget`` (a cell ending with the panel displays it)."""

    widget: widgets.Widget

    def _repr_mimebundle_(self, **kwargs: Any) -> dict[str, Any] | None:
        return self.widget._repr_mimebundle_(**kwargs)


def row(*children: widgets.Widget) -> widgets.Box:
    """Controls side by side that wrap onto the next line in a narrow notebook (~750 px) instead of overlapping."""
    return widgets.Box(list(children), layout=widgets.Layout(flex_flow="row wrap", align_items="flex-start"))


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
