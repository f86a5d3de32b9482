"""Figures of runs: plain functions from the runs and metrics tables to plotly figures.

The only module that builds figures. Each function takes a table that ``load_runs`` (one row per
run), ``load_metrics`` (long format: run, step, split, metric, value), ``spectrum`` or
``spectrum_over_checkpoints`` returns, checks that it has the columns the figure needs, and
returns a ``go.Figure``; the HTML report, the notebook panels and notebooks all draw with these.
``live_runs`` takes run names instead: the empty figure that the workbench panel fills in as its runs log.
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
import plotly.graph_objects as go
from plotly.colors import qualitative
from plotly.subplots import make_subplots

from .adapters import variant_names
from .checks import is_integer
from .selection import best_index, direction, metric_mode

METRICS_COLUMNS = ("run", "step", "split", "metric", "value")
PALETTE = qualitative.Plotly
TEMPLATE = "plotly_white"
LIVE_SERIES = ("train loss", "val loss", "val acc", "checkpoints")  # each run's traces in ``live_runs``, in order


def require_columns(table: pd.DataFrame, columns: Sequence[str], what: str) -> None:
    """Raise ``ValueError`` naming the ``columns`` that ``table`` (called ``what`` in the message) lacks."""
    missing = [column for column in columns if column not in table.columns]
    if missing:
        raise ValueError(f"{what} lacks the column(s) {', '.join(missing)}; it needs {', '.join(columns)}")


def run_color(index: int) -> str:
    """The colour of the ``index``-th run (or layer) drawn in a figure: the palette in turn, from its first colour."""
    return PALETTE[index % len(PALETTE)]


def variant_color(variant: str) -> str:
    """The colour of a registered variant, the same in every figure; one more colour for any other."""
    names = variant_names()
    index = names.index(variant) if variant in names else len(names)
    return PALETTE[index % len(PALETTE)]


def _variant_order(variants: pd.Series) -> list[str]:
    present, names = set(variants), variant_names()
    return [v for v in names if v in present] + sorted(present - set(names))


def _series(metrics: pd.DataFrame, split: str, metric: str, runs: Sequence[str] | None) -> pd.DataFrame:
    """The rows of one logged series (``split``, ``metric``) of the chosen runs, by run and step."""
    require_columns(metrics, METRICS_COLUMNS, "metrics")
    rows = metrics[(metrics["split"] == split) & (metrics["metric"] == metric)]
    if runs is not None:
        rows = rows[rows["run"].isin(list(runs))]
    return rows.sort_values(["run", "step"], kind="stable")


def validation_curves(
    metrics: pd.DataFrame,
    metric: str = "loss",
    split: str = "val",
    runs: Sequence[str] | None = None,
    checkpoints: pd.DataFrame | None = None,
    best: tuple[str, int, float] | None = None,
) -> go.Figure:
    """One line per run: the logged ``split`` ``metric`` (default the validation loss) against the step.

    Args:
        metrics: ``load_metrics``' table: run, step, split, metric, value.
        metric: the metric's logged name, e.g. ``"loss"`` or ``"acc"``.
        split: ``"val"`` (every evaluation), or ``"train"``.
        runs: the runs to draw, by name; default all.
        checkpoints: a table with columns run and step; each run's line gets a marker at each of
            its checkpoint steps where the metric was logged. Example: every run's
            ``CheckpointManager(...).list()`` with a run column added.
        best: ``(run, step, value)`` of a chosen checkpoint, marked with a gold star (trace "best").

    Raises:
        ValueError: a table lacks a column it needs (named in the message).
    """
    series = _series(metrics, split, metric, runs)
    if checkpoints is not None:
        require_columns(checkpoints, ("run", "step"), "checkpoints")
    label = f"{split} {metric}"
    figure = go.Figure()
    for index, (run, points) in enumerate(series.groupby("run", sort=True)):
        color = run_color(index)
        figure.add_trace(go.Scatter(
            x=points["step"], y=points["value"], mode="lines", name=run, legendgroup=run, line={"color": color},
            hovertemplate=f"%{{fullData.name}}<br>step %{{x}}<br>{label} %{{y:.4g}}<extra></extra>",
        ))
        if checkpoints is not None:
            saved = points[points["step"].isin(checkpoints.loc[checkpoints["run"] == run, "step"])]
            figure.add_trace(go.Scatter(
                x=saved["step"], y=saved["value"], mode="markers", name=f"{run} checkpoints", legendgroup=run,
                showlegend=False, marker={"color": color, "size": 8},
                hovertemplate=f"%{{fullData.name}}<br>step %{{x}}<br>{label} %{{y:.4g}}<extra></extra>",
            ))
    if best is not None:
        run, step, value = best
        figure.add_trace(go.Scatter(
            x=[step], y=[value], mode="markers", name="best",
            marker={"symbol": "star", "size": 18, "color": "gold", "line": {"color": "black", "width": 1}},
            hovertemplate=f"best: {run}<br>step %{{x}}<br>{label} %{{y:.4g}}<extra></extra>",
        ))
    title = f"{label.capitalize()} against step" + (" (markers: checkpoints)" if checkpoints is not None else "")
    figure.update_layout(title=title, xaxis_title="step", yaxis_title=label, legend_title_text="run",
                         template=TEMPLATE)
    return figure


def training_loss(metrics: pd.DataFrame, runs: Sequence[str] | None = None, smooth: int = 20) -> go.Figure:
    """One line per run: the training loss against the step, a trailing mean over ``smooth`` logged steps.

    Args:
        metrics: ``load_metrics``' table: run, step, split, metric, value.
        runs: the runs to draw, by name; default all.
        smooth: the window of the moving mean, in logged steps; 1 draws the raw losses.

    Raises:
        ValueError: ``metrics`` lacks a column, or ``smooth`` is not an integer >= 1.
    """
    if not is_integer(smooth) or smooth < 1:
        raise ValueError(f"smooth must be an integer >= 1 (1: no smoothing), not {smooth!r}")
    series = _series(metrics, "train", "loss", runs)
    figure = go.Figure()
    for index, (run, points) in enumerate(series.groupby("run", sort=True)):
        figure.add_trace(go.Scatter(
            x=points["step"], y=points["value"].rolling(smooth, min_periods=1).mean(), mode="lines", name=run,
            line={"color": run_color(index)},
            hovertemplate="%{fullData.name}<br>step %{x}<br>train loss %{y:.4g}<extra></extra>",
        ))
    title = "Training loss" + (f" (mean of the last {smooth} steps)" if smooth > 1 else "")
    figure.update_layout(title=title, xaxis_title="step", yaxis_title="train loss", legend_title_text="run",
                         template=TEMPLATE)
    return figure


def live_runs(runs: Sequence[str]) -> go.Figure:
    """The figure of runs as they train: the loss (left) and the validation accuracy (right), no points yet.

    Run i of ``runs`` (names, in the order given) has the traces ``4 * i`` to ``4 * i + 3``, one
    per series of ``LIVE_SERIES`` in that order, named ``"<run> <series>"`` and all in
    ``run_color(i)``: its training loss (a thin line), validation loss (a thick line, the run's
    one legend entry), validation accuracy (a thick line, right) and checkpoints (diamonds,
    meant to sit on the validation loss at each saved step). Every trace is empty: whoever
    shows the figure fills in x and y (the ``wb.ui.Workbench`` panel does, in place, as runs log).
    """
    figure = make_subplots(rows=1, cols=2, subplot_titles=("loss", "validation accuracy"))
    for index, run in enumerate(runs):
        color = run_color(index)
        styles = {  # series -> (subplot column, trace style)
            "train loss": (1, {"mode": "lines", "opacity": 0.45, "line": {"color": color, "width": 1}}),
            "val loss": (1, {"mode": "lines", "line": {"color": color, "width": 2.5}, "showlegend": True}),
            "val acc": (2, {"mode": "lines", "line": {"color": color, "width": 2.5}}),
            "checkpoints": (1, {"mode": "markers", "marker": {"color": color, "size": 9, "symbol": "diamond"}}),
        }
        for series in LIVE_SERIES:
            column, style = styles[series]
            figure.add_scatter(name=f"{run} {series}", legendgroup=run, row=1, col=column,
                               **{"showlegend": False, **style})
    figure.update_layout(template=TEMPLATE, height=400, margin={"t": 70, "b": 40}, legend_title_text="run",
                         autosize=True, title={"text": "thin: training loss, thick: validation, diamonds: checkpoints",
                                               "font": {"size": 13}})
    figure.update_xaxes(title_text="step")
    return figure


def _scored(runs: pd.DataFrame, value: str, needed: Sequence[str]) -> tuple[pd.DataFrame, str, str]:
    """The runs with a number in ``value``, the name of what ``value`` measures, and its mode.

    ``best_value`` measures each run's monitor; runs that monitor different metrics are refused,
    since their best values do not compare.
    """
    require_columns(runs, [*needed, value, *(["monitor"] if value == "best_value" else [])], "runs")
    name = value
    if value == "best_value":
        monitors = sorted(set(runs["monitor"].dropna()))
        if len(monitors) > 1:
            raise ValueError(f"the runs monitor different metrics ({', '.join(monitors)}); their best values do "
                             "not compare: plot the runs of one monitor at a time")
        name = monitors[0] if monitors else value
    scored = runs.assign(**{value: pd.to_numeric(runs[value], errors="coerce")}).dropna(subset=[value])
    return scored, name, metric_mode(name)


def best_by_variant_and_rank(runs: pd.DataFrame, value: str = "best_value") -> go.Figure:
    """Grouped bars: for each rank, one bar per variant, the best ``value`` over that variant's runs at that rank.

    With several runs of a variant at a rank (learning rates, seeds) the best counts: the lowest
    for a loss, the highest for an accuracy; hovering a bar names its run.

    Args:
        runs: ``load_runs``' table; needs run, variant, rank, ``value`` (and monitor for ``best_value``).
        value: a column of numbers: ``"best_value"`` (each run's best validation monitor),
            ``"test_loss"``, ``"test_acc"``, ...

    Raises:
        ValueError: a missing column, or ``best_value`` of runs that monitor different metrics.
    """
    scored, name, mode = _scored(runs, value, ("run", "variant", "rank"))
    groups = scored.groupby(["variant", "rank"])[value]
    best = scored.loc[[index for _, group in groups if (index := best_index(group, mode)) is not None]]
    ranks = sorted(best["rank"].unique())
    figure = go.Figure()
    for variant in _variant_order(best["variant"]):
        bars = best[best["variant"] == variant].sort_values("rank")
        figure.add_trace(go.Bar(
            x=[f"rank {r}" for r in bars["rank"]], y=bars[value], name=variant, customdata=bars["run"],
            marker_color=variant_color(variant), text=[f"{v:.3g}" for v in bars[value]], textposition="outside",
            hovertemplate=f"%{{customdata}}<br>{name} %{{y:.4g}}<extra></extra>",
        ))
    figure.update_layout(title=f"Best {name} by variant and rank ({direction(mode)} over each variant's runs)",
                         barmode="group", xaxis={"title": "rank", "categoryorder": "array",
                                                 "categoryarray": [f"rank {r}" for r in ranks]},
                         yaxis_title=name, legend_title_text="variant", template=TEMPLATE)
    return figure


def parameters_vs_metric(runs: pd.DataFrame, value: str = "best_value") -> go.Figure:
    """Scatter of each run's trainable parameters (log x) against its ``value``, coloured by variant, labelled by rank.

    Args:
        runs: ``load_runs``' table; needs run, variant, rank, trainable, ``value`` (and monitor for
            ``best_value``).
        value: a column of numbers, as for ``best_by_variant_and_rank``.

    Raises:
        ValueError: a missing column, or ``best_value`` of runs that monitor different metrics.
    """
    scored, name, _ = _scored(runs, value, ("run", "variant", "rank", "trainable"))
    figure = go.Figure()
    for variant in _variant_order(scored["variant"]):
        points = scored[scored["variant"] == variant]
        figure.add_trace(go.Scatter(
            x=points["trainable"], y=points[value], mode="markers+text", name=variant,
            text=[f"r{r}" for r in points["rank"]], textposition="top center", customdata=points["run"],
            marker={"color": variant_color(variant), "size": 10},
            hovertemplate=f"%{{customdata}}<br>trainable %{{x:,}}<br>{name} %{{y:.4g}}<extra></extra>",
        ))
    figure.update_layout(title=f"Trainable parameters against {name} (labels: rank)",
                         xaxis={"title": "trainable parameters", "type": "log"}, yaxis_title=name,
                         legend_title_text="variant", template=TEMPLATE)
    return figure


def spectrum(table: pd.DataFrame, energy: float | None = 0.9) -> go.Figure:
    """Two panels, one line per layer: its update's singular values (left) and their cumulative energy (right).

    Args:
        table: ``wb.spectrum``'s table: layer, index, value, energy.
        energy: draw this level as a dotted line on the energy panel (where a layer's line
            crosses it is its effective rank); None draws none.

    Raises:
        ValueError: ``table`` lacks a column it needs.
    """
    require_columns(table, ("layer", "index", "value", "energy"), "spectrum")
    figure = make_subplots(rows=1, cols=2, subplot_titles=("singular values", "cumulative energy"))
    for number, (layer, points) in enumerate(table.groupby("layer", sort=False)):
        points = points.sort_values("index")
        color = run_color(number)
        for column, (field, label) in enumerate((("value", "s"), ("energy", "energy")), start=1):
            figure.add_trace(go.Scatter(
                x=points["index"], y=points[field], mode="lines+markers", name=layer, legendgroup=layer,
                showlegend=column == 1, line={"color": color},
                hovertemplate=f"%{{fullData.name}}<br>index %{{x}}<br>{label} %{{y:.4g}}<extra></extra>",
            ), row=1, col=column)
    if energy is not None:
        figure.add_hline(y=energy, line_dash="dot", line_color="gray", row=1, col=2)
    figure.update_xaxes(title_text="index (1 = largest)")
    figure.update_yaxes(title_text="singular value", rangemode="tozero", row=1, col=1)
    figure.update_yaxes(title_text="fraction of sum s^2", range=[0, 1.05], row=1, col=2)
    figure.update_layout(title="Spectrum of each adapter's update", legend_title_text="layer", template=TEMPLATE)
    return figure


def effective_rank_over_checkpoints(table: pd.DataFrame) -> go.Figure:
    """One line per layer (per run and layer, for several runs): its effective rank at each checkpoint step.

    Args:
        table: ``wb.spectrum_over_checkpoints``' table: step, layer, effective_rank (and run).

    Raises:
        ValueError: ``table`` lacks a column it needs.
    """
    require_columns(table, ("step", "layer", "effective_rank"), "effective ranks")
    several = "run" in table.columns and table["run"].nunique() > 1
    keys = ["run", "layer"] if several else ["layer"]
    figure = go.Figure()
    for number, (key, points) in enumerate(table.groupby(keys, sort=False)):
        name = "/".join(str(k) for k in key)
        figure.add_trace(go.Scatter(
            x=points["step"], y=points["effective_rank"], mode="lines+markers", name=name,
            line={"color": run_color(number), "shape": "hv"},
            hovertemplate="%{fullData.name}<br>step %{x}<br>effective rank %{y}<extra></extra>",
        ))
    figure.update_layout(title="Effective rank of each layer's update across checkpoints", xaxis_title="step",
                         yaxis={"title": "effective rank", "dtick": 1, "rangemode": "tozero"},
                         legend_title_text="/".join(keys), template=TEMPLATE)
    return figure
