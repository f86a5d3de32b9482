"""Figures of runs: plain functions from the runs and metrics tables to plotly figures.

The only module that builds figures. Each function takes a table that ``load_runs`` (one row per
run), ``load_metrics`` (long format: run, step, split, metric, value), ``spectrum`` or
``spectrum_over_checkpoints`` returns, checks that it has the columns the figure needs, and
returns a ``go.Figure``; the HTML report, the notebook panels and notebooks all draw with these.
``live_runs`` takes run names instead: the empty figure that the workbench panel fills in as its runs log.
``pareto``, ``pareto_fronts`` and ``lr_sensitivity`` take ``summarize``'s table (one row per
configuration, intervals over seeds); ``validation_bands`` takes the runs and metrics tables.

One colour rule: a variant's hue is ``variant_color(variant)`` in every figure (the registered
variants in registration order, then the baselines "full" and "head"); where a figure shows
several ranks, the line dash is the rank's (``rank_dash``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.colors import hex_to_rgb, qualitative
from plotly.subplots import make_subplots

from . import save_interval as intervals
from .adapters import variant_names
from .baselines import BASELINES  # variant names of the baselines (no adapter, no rank): coloured after the variants
from .checkpoints import stages
from .checks import is_integer
from .selection import best_index, direction, metric_mode
from .stats import interval, pareto_front

METRICS_COLUMNS = ("run", "step", "split", "metric", "value")
PALETTE = qualitative.Plotly
TEMPLATE = "plotly_white"
LIVE_SERIES = ("train loss", "val loss", "val acc", "checkpoints")  # each run's traces in ``live_runs``, in order
DASHES = ("solid", "dot", "dash", "longdash", "dashdot", "longdashdot")  # ranks, smallest first
RANK_SYMBOLS = ("circle", "square", "diamond", "triangle-up", "cross", "star")  # ranks in scatters, smallest first
COSTS = {  # summarize's cost column -> (axis title, divisor from the column's unit to the axis', hover format)
    "trainable": ("trainable parameters", 1.0, ",.0f"),
    "peak_rss": ("peak resident memory (MB)", 1e6, ",.1f"),
    "wall_time": ("wall time (s)", 1.0, ",.1f"),
}
SUMMARY_COLUMNS = ("variant", "rank", "lr", "options", "monitor", "n", "best_mean", "best_low", "best_high")
BANDS = {"range": "min to max over seeds", "interval": "95% t interval over seeds"}  # validation_bands' bands
FRONT = "ringed and joined: the Pareto front, where nothing cheaper does better"
OFF_THE_AXIS = "dotted, off the axis range"  # what becomes of a flagged run in validation_curves and training_loss
BLOWUP = 10.0  # a loss above this many times the runs' median first value has blown up (validation_bands)


def require_columns(table: pd.DataFrame, columns: Sequence[str], what: str) -> None:
    """Raise ``ValueError`` naming the ``columns`` that ``table`` (called ``what`` in the message) lacks."""
    missing = [column for column in columns if column not in table.columns]
    if missing:
        raise ValueError(f"{what} lacks the column(s) {', '.join(missing)}; it needs {', '.join(columns)}")


def run_color(index: int) -> str:
    """The colour of the ``index``-th run (or layer) drawn in a figure: the palette in turn, from its first colour."""
    return PALETTE[index % len(PALETTE)]


def _color_order() -> list[str]:
    """The registered variants in registration order, then the baselines: the order of their colours."""
    names = list(variant_names())
    return names + [name for name in BASELINES if name not in names]


def variant_color(variant: str) -> str:
    """The colour of a variant, the same in every figure: one per registered variant (in registration
    order), then one each for the baselines "full" and "head"; one more colour for any other name."""
    order = _color_order()
    index = order.index(variant) if variant in order else len(order)
    return PALETTE[index % len(PALETTE)]


def rank_dash(rank: Any, ranks: Sequence[Any]) -> str:
    """The line dash of ``rank`` in a figure showing ``ranks``: ``DASHES`` in turn from the smallest rank;
    a baseline's missing rank is solid (its colour tells it apart)."""
    if pd.isna(rank):
        return "solid"
    known = sorted({int(r) for r in ranks if not pd.isna(r)})
    return DASHES[known.index(int(rank)) % len(DASHES)]


def configuration_name(variant: str, rank: Any = None, lr: Any = None, options: Any = "") -> str:
    """A configuration as legends and hovers name it: ``"lora r8 lr=0.01 (init=pissa)"``; a baseline has no rank."""
    parts = [str(variant)]
    if rank is not None and not pd.isna(rank):
        parts.append(f"r{int(rank)}")
    if lr is not None and not pd.isna(lr):
        parts.append(f"lr={float(lr):g}")
    if isinstance(options, str) and options:
        parts.append(f"({options})")
    return " ".join(parts)


def _variant_order(variants: pd.Series) -> list[str]:
    present, order = set(variants), _color_order()
    return [v for v in order if v in present] + sorted(present - set(order))


def _rgba(color: str, alpha: float) -> str:
    red, green, blue = hex_to_rgb(color)
    return f"rgba({red},{green},{blue},{alpha})"


def _shade(color: str, index: int, count: int) -> str:
    """The ``index``-th of ``count`` shades of ``color``: the last is ``color``, the first paler (mixed with white)."""
    if index >= count - 1:
        return color
    paleness = 0.6 * (count - 1 - index) / (count - 1)
    return "#" + "".join(f"{round(c + (255 - c) * paleness):02x}" for c in hex_to_rgb(color))


def _series(metrics: pd.DataFrame, split: str, metric: str, runs: Sequence[str] | None) -> pd.DataFrame:
    """The rows of one logged series (``split``, ``metric``) of the chosen runs, by run and step."""
    require_columns(metrics, METRICS_COLUMNS, "metrics")
    rows = metrics[(metrics["split"] == split) & (metrics["metric"] == metric)]
    if runs is not None:
        rows = rows[rows["run"].isin(list(runs))]
    return rows.sort_values(["run", "step"], kind="stable")


def _log_axis(figure: go.Figure, values: pd.Series, kept: pd.Series | None = None) -> go.Figure:
    """A loss's y axis: logarithmic where every value of the runs ``kept`` on the axis is positive (a
    spike does not flatten the rest), with buttons to switch between log and linear. Given ``kept``
    (the values of the runs not flagged), the axis spans those only: a flagged run's line leaves it."""
    shown = pd.to_numeric(values if kept is None else kept, errors="coerce").to_numpy(dtype=float)
    log = bool(len(shown)) and bool((shown > 0).all())
    finite = shown[np.isfinite(shown)]
    ranges: dict[str, list[float] | None] = {"log": None, "linear": None}
    if kept is not None and len(finite):
        low, high = float(finite.min()), float(finite.max())
        pad = 0.05 * (high - low) or 0.05 * abs(high) or 1.0
        ranges["linear"] = [low - pad, high + pad]
        if low > 0:
            low, high = math.log10(low), math.log10(high)
            pad = 0.05 * (high - low) or 0.05
            ranges["log"] = [low - pad, high + pad]
    chosen = "log" if log else "linear"
    figure.update_yaxes(type=chosen, range=ranges[chosen])
    return _log_toggle(figure, log, ranges)


def _log_toggle(figure: go.Figure, log: bool, ranges: dict[str, list[float] | None] | None = None) -> go.Figure:
    """Buttons above the first y axis's plot that switch it between log and linear (``log``: log at first),
    each to its ``ranges`` entry (None: the range plotly picks)."""
    ranges = ranges or {}
    buttons = [{"label": label, "method": "relayout",
                "args": [{"yaxis.type": label, "yaxis.range": ranges.get(label),
                          "yaxis.autorange": ranges.get(label) is None}]} for label in ("log", "linear")]
    figure.update_layout(updatemenus=[{"type": "buttons", "direction": "left", "buttons": buttons, "x": 1.0,
                                       "xanchor": "right", "y": 1.12, "yanchor": "bottom", "showactive": True,
                                       "active": 0 if log else 1}])
    return figure


def _legend_below(figure: go.Figure, entries: int, most: int = 10) -> go.Figure:
    """More than ``most`` legend entries go in rows below the plot, the figure taller to hold them, so none
    hides behind a scrolling legend beside it."""
    if entries > most:
        rows = math.ceil(entries / 3)
        figure.update_layout(legend={"orientation": "h", "yanchor": "top", "y": -0.18, "x": 0},
                             height=460 + 22 * rows, margin={"b": 80 + 22 * rows})
    return figure


def _run_lines(series: pd.DataFrame) -> dict[str, dict[str, str]]:
    """Each run's line style: its variant's colour and its rank's dash where the table names them
    (``load_metrics`` does), else the palette in turn by run name."""
    runs = series.drop_duplicates("run").sort_values("run")
    if {"variant", "rank"} <= set(series.columns):
        return {row.run: {"color": variant_color(row.variant), "dash": rank_dash(row.rank, runs["rank"])}
                for row in runs.itertuples()}
    return {run: {"color": run_color(index)} for index, run in enumerate(runs["run"])}


def _flagged_line(run: str, lines: dict[str, dict[str, str]], flagged: dict[str, str]) -> dict[str, Any]:
    """A curve's trace name and line: its run's (``_run_lines``), dotted, thin and named "(flagged)" if flagged."""
    if run not in flagged:
        return {"name": run, "line": lines[run]}
    return {"name": f"{run} (flagged)", "line": lines[run] | {"dash": "dot", "width": 1}}


def _finish_loss_curves(figure: go.Figure, series: pd.DataFrame, flagged: dict[str, str]) -> go.Figure:
    """A loss figure's y axis (``_log_axis``), spanning the runs that are not flagged when some are."""
    kept = series.loc[~series["run"].isin(flagged), "value"] if flagged else None
    return _log_axis(figure, series["value"], kept)


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
        metrics: ``load_metrics``' table: run, step, split, metric, value; with its variant and
            rank columns each run's line has its variant's colour and its rank's dash (else the
            palette in turn). A loss (lower is better) is drawn on a log axis, with a log/linear toggle.
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
    lines, loss = _run_lines(series), metric_mode(f"{split}_{metric}") == "min"
    flagged = _flagged(None, series, "min") if loss else {}
    figure = go.Figure()
    for run, points in series.groupby("run", sort=True):
        color = lines[run]["color"]
        figure.add_trace(go.Scatter(
            x=points["step"], y=points["value"], mode="lines", legendgroup=run, **_flagged_line(run, lines, flagged),
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
    if flagged:
        title += f"<br><sup>{_flag_note(flagged, OFF_THE_AXIS)}</sup>"
    figure.update_layout(title=title, xaxis_title="step", yaxis_title=label, legend_title_text="run",
                         template=TEMPLATE)
    _legend_below(figure, len(lines))
    return _finish_loss_curves(figure, series, flagged) if loss else figure


def training_loss(metrics: pd.DataFrame, runs: Sequence[str] | None = None, smooth: int = 20) -> go.Figure:
    """One line per run: the training loss against the step, a trailing mean over ``smooth`` logged steps.

    Lines as in ``validation_curves`` (variant colour, rank dash), on a log axis with a log/linear toggle.

    Args:
        metrics: ``load_metrics``' table: run, step, split, metric, value (and variant, rank).
        runs: the runs to draw, by name; default all.
        smooth: the window of the moving mean, in logged steps; 1 draws the raw losses.

    Raises:
        ValueError: ``metrics`` lacks a column, or ``smooth`` is not an integer >= 1.
    """
    if not is_integer(smooth) or smooth < 1:
        raise ValueError(f"smooth must be an integer >= 1 (1: no smoothing), not {smooth!r}")
    series = _series(metrics, "train", "loss", runs)
    series = series.assign(value=pd.to_numeric(series["value"], errors="coerce").groupby(series["run"]).transform(
        lambda losses: losses.rolling(smooth, min_periods=1).mean()))
    lines, flagged = _run_lines(series), _flagged(None, series, "min")
    figure = go.Figure()
    for run, points in series.groupby("run", sort=True):
        figure.add_trace(go.Scatter(
            x=points["step"], y=points["value"], mode="lines", **_flagged_line(run, lines, flagged),
            hovertemplate="%{fullData.name}<br>step %{x}<br>train loss %{y:.4g}<extra></extra>",
        ))
    title = "Training loss" + (f" (mean of the last {smooth} steps)" if smooth > 1 else "")
    if flagged:
        title += f"<br><sup>{_flag_note(flagged, OFF_THE_AXIS)}</sup>"
    figure.update_layout(title=title, xaxis_title="step", yaxis_title="train loss", legend_title_text="run",
                         template=TEMPLATE)
    _legend_below(figure, len(lines))
    return _finish_loss_curves(figure, series, flagged)


def live_runs(runs: Sequence[str], variants: Sequence[str] | None = None,
              ranks: Sequence[int | None] | None = None, steps: int | None = None) -> go.Figure:
    """The figure of runs as they train: the loss (left) and the validation accuracy (right), no points yet.

    Run i of ``runs`` (names, in the order given) has the traces ``4 * i`` to ``4 * i + 3``, one
    per series of ``LIVE_SERIES`` in that order, each with ``meta`` ``"<run> <series>"`` and
    named so too but for the validation loss (named ``"<run>"``, the run's one legend entry), all
    in one colour: its training loss (a thin line), validation loss (a thick line), validation
    accuracy (a thick line, right) and checkpoints (diamonds,
    meant to sit on the validation loss at each saved step). Every trace is empty: whoever
    shows the figure fills in x and y (the ``wb.ui.Workbench`` panel does, in place, as runs log).
    With ``variants`` (and ``ranks``), one per run, a run's colour is its variant's and its
    validation lines have its rank's dash, as in every other figure; else the palette in turn.
    ``steps``: the runs' length, which the x axes span from the start. With no run, the figure has
    no axes, only a line saying what will appear.
    """
    figure = make_subplots(rows=1, cols=2, subplot_titles=("loss", "validation accuracy"))
    for index, run in enumerate(runs):
        color = variant_color(variants[index]) if variants is not None else run_color(index)
        dash = rank_dash(ranks[index], ranks) if ranks is not None else "solid"
        styles = {  # series -> (subplot column, trace style)
            "train loss": (1, {"mode": "lines", "opacity": 0.45, "line": {"color": color, "width": 1}}),
            "val loss": (1, {"mode": "lines", "line": {"color": color, "width": 2.5, "dash": dash},
                             "showlegend": True}),
            "val acc": (2, {"mode": "lines", "line": {"color": color, "width": 2.5, "dash": dash}}),
            "checkpoints": (1, {"mode": "markers", "marker": {"color": color, "size": 9, "symbol": "diamond"}}),
        }
        for series in LIVE_SERIES:
            column, style = styles[series]
            name = run if series == "val loss" else f"{run} {series}"  # the legend names the run
            figure.add_scatter(name=name, meta=f"{run} {series}", legendgroup=run, row=1, col=column,
                               **{"showlegend": False, **style})
    figure.update_layout(template=TEMPLATE, height=430, margin={"t": 70, "b": 40}, legend_title_text="run",
                         legend={"orientation": "h", "y": -0.22, "x": 0}, autosize=True,
                         title={"text": "thin: training loss, thick: validation, diamonds: checkpoints",
                                "font": {"size": 13}})
    figure.update_xaxes(title_text="step", range=[0, steps] if steps else None)
    figure.update_yaxes(type="log", row=1, col=1)  # the loss: a first spike does not flatten the rest
    _log_toggle(figure, True)
    if not runs:
        figure.update_xaxes(visible=False)
        figure.update_yaxes(visible=False)
        figure.layout.annotations = figure.layout.updatemenus = ()  # no titles or buttons over empty space
        figure.add_annotation(text="Launch a run: its losses, validation accuracy and checkpoints appear here as "
                              "it trains", showarrow=False, xref="paper", yref="paper", x=0.5, y=0.5, font={"size": 14})
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
    """Scatter of each run's trainable parameters (log x) against its ``value``: colour the variant, marker the rank.

    No text labels on the points (with many runs they print over each other): the rank is the
    marker's shape, named in the subtitle, and hovering a point names its run.

    Args:
        runs: ``load_runs``' table; needs run, variant, rank, trainable, ``value`` (and monitor for
            ``best_value``).
        value: a column of numbers, as for ``best_by_variant_and_rank``.

    Raises:
        ValueError: a missing column, or ``best_value`` of runs that monitor different metrics.
    """
    scored, name, _ = _scored(runs, value, ("run", "variant", "rank", "trainable"))
    ranks = sorted({int(r) for r in scored["rank"].dropna()})
    symbols = {rank: RANK_SYMBOLS[index % len(RANK_SYMBOLS)] for index, rank in enumerate(ranks)}
    figure = go.Figure()
    for variant in _variant_order(scored["variant"]):
        points = scored[scored["variant"] == variant]
        figure.add_trace(go.Scatter(
            x=points["trainable"], y=points[value], mode="markers", name=variant,
            text=["no rank" if pd.isna(r) else f"rank {int(r)}" for r in points["rank"]], customdata=points["run"],
            marker={"color": variant_color(variant), "size": 10, "line": {"color": "white", "width": 1},
                    "symbol": ["circle" if pd.isna(r) else symbols[int(r)] for r in points["rank"]]},
            hovertemplate=f"%{{customdata}} (%{{text}})<br>trainable %{{x:,}}<br>{name} %{{y:.4g}}<extra></extra>",
        ))
    legend = ", ".join(f"{symbol.replace('-', ' ')}: r{rank}" for rank, symbol in symbols.items())
    figure.update_layout(title=f"Trainable parameters against {name}<br><sup>marker: rank ({legend}); hover names "
                         "the run</sup>",
                         xaxis={"title": "trainable parameters", "type": "log"}, yaxis_title=name,
                         legend_title_text="variant", template=TEMPLATE)
    return figure


STAGE_SYMBOLS = dict(zip(stages.COMPRESSION_STAGES, ("circle", "x", "diamond"), strict=True))  # in their order


def compression_stages(runs: pd.DataFrame, value: str = "test_loss") -> go.Figure:
    """Each compressed run's ``value`` against the model's parameter count, stages joined per compression.

    Args:
        runs: ``load_runs``' table; needs compression, compression_stage, parameters and ``value``;
            runs that are not compressed are left out.
        value: a column of numbers: test_loss, test_acc, test_ppl, ...

    One line per compression (``"energy=0.9"``) through its stages, svd (the original at full
    rank), rank-reduced and finetuned (recovered), each stage with its own marker.

    Raises:
        ValueError: a missing column.
    """
    require_columns(runs, ("compression", "compression_stage", "parameters", value), "compression_stages")
    staged = runs[runs["compression_stage"].isin(list(STAGE_SYMBOLS))]
    figure = go.Figure()
    for index, (label, rows) in enumerate(staged.groupby("compression", sort=True)):
        rows = rows.assign(order=rows["compression_stage"].map(stages.COMPRESSION_STAGES.index)).sort_values("order")
        figure.add_trace(go.Scatter(
            x=rows["parameters"], y=rows[value], mode="lines+markers", name=label,
            line={"color": run_color(index)}, text=rows["compression_stage"],
            marker={"size": 11, "symbol": [STAGE_SYMBOLS[s] for s in rows["compression_stage"]]},
            hovertemplate=f"{label}, %{{text}}<br>parameters %{{x:,}}<br>{_metric_label(value)} %{{y:.4g}}"
                          "<extra></extra>",
        ))
    figure.update_layout(title=f"{_metric_label(value).capitalize()} against model size, by compression stage "
                         "(circle: svd, x: rank-reduced, diamond: finetuned)",
                         xaxis_title="parameters", yaxis_title=_metric_label(value),
                         legend_title_text="compression", template=TEMPLATE)
    return figure


def save_interval(write_seconds: float, mtbf_seconds: float, chosen_seconds: float | None = None) -> go.Figure:
    """The share of a run's time lost to checkpointing against the interval between checkpoints.

    Writing costs C / tau (``workbench.save_interval.overhead``) and failures lose (tau + C) / (2 MTBF)
    (``lost_work``); their sum is least at Young's tau* = sqrt(2 C MTBF), marked, beside the interval a
    run chose (``chosen_seconds``), if given. Intervals on a log axis, from tau* / 100 to tau* x 100.
    """
    optimal = intervals.young_daly(write_seconds, mtbf_seconds)
    tau = optimal * np.logspace(-2, 2, 161)
    spent = intervals.overhead(tau, write_seconds)
    lost = intervals.lost_work(tau, write_seconds, mtbf_seconds)
    figure = go.Figure()
    for name, y, dash in (("writing checkpoints", spent, "dot"), ("work lost to failures", lost, "dash"),
                          ("both", spent + lost, "solid")):
        hover = f"{name}<br>every %{{x:.3g}} s: %{{y:.3g}}% of the time<extra></extra>"
        figure.add_trace(go.Scatter(x=tau, y=100 * y, mode="lines", name=name, line={"dash": dash},
                                    hovertemplate=hover))
    marks = [("Young/Daly optimum", optimal)] + ([("chosen", chosen_seconds)] if chosen_seconds else [])
    for name, seconds in marks:
        share = intervals.overhead(seconds, write_seconds) + intervals.lost_work(seconds, write_seconds, mtbf_seconds)
        figure.add_trace(go.Scatter(x=[seconds], y=[100 * share], mode="markers", name=f"{name}: every {seconds:.3g} s",
                                    marker={"size": 11, "symbol": "diamond" if name == "chosen" else "circle"}))
    figure.update_layout(title=f"Checkpoint interval: a write costs {write_seconds:.3g} s (measured), failures come "
                         f"every {mtbf_seconds / 3600:.3g} h on average (MTBF)",
                         xaxis={"title": "seconds of training between checkpoints", "type": "log"},
                         yaxis={"title": "% of the run's time", "rangemode": "tozero"}, template=TEMPLATE)
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
    largest = int(table["index"].max()) if len(table) else 1
    figure.update_xaxes(title_text="index (1 = largest)", tickformat="d", dtick=1 if largest <= 16 else None)
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


# -- configurations: summarize's table ------------------------------------------------------------


def _metric_label(name: str | None) -> str:
    """A logged metric's name as axes say it: ``"val_loss"`` -> ``"validation loss"``."""
    if not name:
        return "best value"
    split, _, metric = str(name).partition("_")
    splits = {"val": "validation", "test": "test", "train": "training", "forget": "forget"}
    metrics = {"acc": "accuracy", "ppl": "perplexity"}
    return f"{splits[split]} {metrics.get(metric, metric)}" if metric and split in splits else str(name)


def _summary_monitor(summary: pd.DataFrame, columns: Sequence[str]) -> str | None:
    """The one monitor of ``summary``'s configurations (None for no row), after checking its columns and task."""
    require_columns(summary, columns, "summary (wb.summarize's table)")
    monitors = sorted(set(summary["monitor"].dropna()))
    if len(monitors) > 1:
        raise ValueError(f"the configurations monitor {', '.join(monitors)}; their best values do not compare: "
                         "plot the configurations of one monitor at a time")
    if "task" in summary.columns and summary["task"].nunique() > 1:
        raise ValueError(f"the configurations are of the tasks {', '.join(sorted(summary['task'].unique()))}; "
                         "their values do not compare: plot one task at a time")
    return monitors[0] if monitors else None


def _numbers(table: pd.DataFrame, column: str) -> np.ndarray:
    return pd.to_numeric(table[column], errors="coerce").to_numpy(dtype=float)


def _names(table: pd.DataFrame) -> list[str]:
    return [configuration_name(row.variant, row.rank, row.lr, row.options) for row in table.itertuples()]


def _interval_text(low: np.ndarray, high: np.ndarray) -> list[str]:
    return [f"95% interval {lo:.4g} to {hi:.4g}" if math.isfinite(lo) and math.isfinite(hi)
            else "no interval (one seed)" for lo, hi in zip(low, high, strict=True)]


def _pareto_traces(summary: pd.DataFrame, cost: str, monitor: str | None) -> tuple[list[go.Scatter], int]:
    """A marker trace per variant and the front's trace for one ``cost``; how many configurations lack the cost."""
    label, scale, form = COSTS[cost]
    mode, metric = metric_mode(monitor or ""), _metric_label(monitor)
    costs, means = _numbers(summary, cost), _numbers(summary, "best_mean")
    known = (costs > 0) & np.isfinite(means)  # a log axis has no place for a zero cost
    drawn = summary[known].assign(_cost=costs[known])
    hover = (f"%{{customdata[0]}}<br>n %{{customdata[1]}} seed(s)<br>{label} %{{x:{form}}}<br>"
             f"best {metric} %{{y:.4g}}<br>%{{customdata[2]}}<extra></extra>")
    traces = []
    for variant in _variant_order(drawn["variant"]):
        points = drawn[drawn["variant"] == variant]
        mean, low, high = (_numbers(points, c) for c in ("best_mean", "best_low", "best_high"))
        color = variant_color(variant)
        traces.append(go.Scatter(
            x=points["_cost"] / scale, y=mean, mode="markers", name=variant, legendgroup=variant,
            marker={"color": color, "size": 10},
            error_y={"type": "data", "symmetric": False, "array": high - mean, "arrayminus": mean - low,
                     "color": color, "thickness": 1.5, "width": 4},
            customdata=np.column_stack([_names(points), points["n"].astype(str), _interval_text(low, high)]),
            hovertemplate=hover,
        ))
    front = drawn[pareto_front(drawn, "_cost", "best_mean", mode)].sort_values("_cost", kind="stable")
    traces.append(go.Scatter(
        x=front["_cost"] / scale, y=_numbers(front, "best_mean"), mode="lines+markers", name="Pareto front",
        legendgroup="Pareto front", line={"color": "black", "width": 1, "dash": "dot"},
        marker={"symbol": "circle-open", "size": 17, "color": "black", "line": {"width": 2}},
        customdata=_names(front), hovertemplate=f"Pareto front: %{{customdata}}<br>{label} %{{x:{form}}}<br>"
                                                f"best {metric} %{{y:.4g}}<extra></extra>",
    ))
    return traces, len(summary) - len(drawn)


def _check_cost(cost: str) -> None:
    if cost not in COSTS:
        raise ValueError(f"cost must be one of {', '.join(COSTS)} (trainable parameters, peak resident memory in "
                         f"bytes, wall time in seconds), not {cost!r}")


def pareto(summary: pd.DataFrame, cost: str = "trainable") -> go.Figure:
    """Each configuration's cost (log x) against its best validation metric, the Pareto front ringed and joined.

    A configuration's point is the mean over its seeds of each run's best validation value (the
    runs' monitor, which names the y axis), with bars from ``best_low`` to ``best_high`` (its 95%
    interval; none for one seed); one colour per variant (``variant_color``); hovering names the
    configuration (variant, rank, lr, options) and its number of seeds. The front is
    ``wb.stats.pareto_front`` with the monitor's mode (``wb.selection.metric_mode``): the
    configurations no other is both cheaper than and better than, joined in order of cost.
    Configurations without the cost (or without a best value) are left out and counted in the title.

    Args:
        summary: ``wb.summarize``'s table, of one task and one monitor.
        cost: ``"trainable"`` (parameters), ``"peak_rss"`` (bytes, drawn in MB) or ``"wall_time"`` (seconds).

    Raises:
        ValueError: an unknown ``cost`` (the message names the valid ones), a missing column, or
            configurations of several tasks or monitors.
    """
    _check_cost(cost)
    monitor = _summary_monitor(summary, [*SUMMARY_COLUMNS, cost])
    traces, left_out = _pareto_traces(summary, cost, monitor)
    label, metric = COSTS[cost][0], _metric_label(monitor)
    title = f"Best {metric} against {label.split(' (')[0]}<br><sup>bars: 95% interval over seeds; {FRONT}</sup>"
    if left_out:
        title = title.replace("</sup>", f"; {left_out} configuration(s) without {cost} or a best value left out</sup>")
    figure = go.Figure(traces)
    figure.update_layout(title=title, xaxis={"title": label, "type": "log"},
                         yaxis_title=f"best {metric} (mean over seeds)", legend_title_text="variant",
                         template=TEMPLATE)
    return figure


def pareto_fronts(summary: pd.DataFrame, costs: Sequence[str] = tuple(COSTS)) -> go.Figure:
    """``pareto`` for each of ``costs``, side by side (one subplot each, log x), sharing the y axis and the legend.

    Each subplot's title counts the configurations on its front; a cost no configuration recorded
    (``peak_rss`` where it was not measurable) leaves its subplot empty, saying so in its title.

    Args:
        summary: ``wb.summarize``'s table, of one task and one monitor.
        costs: columns of ``COSTS``, in the order drawn.

    Raises:
        ValueError: as ``pareto``.
    """
    for cost in costs:
        _check_cost(cost)
    monitor = _summary_monitor(summary, [*SUMMARY_COLUMNS, *costs])
    drawn = [_pareto_traces(summary, cost, monitor) for cost in costs]
    titles = [f"{len(traces[-1].x)} of {len(summary) - left_out} on the front" if left_out < len(summary)
              else f"{cost}: not recorded" if len(summary) else "no configuration"
              for cost, (traces, left_out) in zip(costs, drawn, strict=True)]
    figure = make_subplots(rows=1, cols=len(costs), shared_yaxes=True, horizontal_spacing=0.03,
                           subplot_titles=titles)
    shown: set[str] = set()
    for column, (traces, _) in enumerate(drawn, start=1):
        for trace in traces:
            trace.showlegend = trace.name not in shown
            shown.add(trace.name)
            figure.add_trace(trace, row=1, col=column)
        figure.update_xaxes(title_text=COSTS[costs[column - 1]][0], type="log", row=1, col=column)
    metric = _metric_label(monitor)
    figure.update_yaxes(title_text=f"best {metric} (mean over seeds)", row=1, col=1)
    figure.update_layout(title=f"Best {metric} against each cost<br><sup>bars: 95% interval over seeds; {FRONT}</sup>",
                         legend_title_text="variant", template=TEMPLATE)
    return figure


def _segments(finite: np.ndarray) -> list[np.ndarray]:
    """The positions of each maximal run of True in ``finite``."""
    positions = np.flatnonzero(finite)
    return [part for part in np.split(positions, np.flatnonzero(np.diff(positions) > 1) + 1) if part.size]


def _band(x: np.ndarray, low: np.ndarray, high: np.ndarray, name: str, color: str) -> list[go.Scatter]:
    """Shaded bands from ``low`` to ``high``, one per run of consecutive points where both are finite (of 2+ points)."""
    bands = []
    for part in _segments(np.isfinite(low) & np.isfinite(high)):
        if part.size < 2:
            continue
        bands.append(go.Scatter(
            x=np.concatenate([x[part], x[part][::-1]]), y=np.concatenate([high[part], low[part][::-1]]),
            mode="lines", fill="toself", fillcolor=_rgba(color, 0.18), line={"width": 0}, name=f"{name} band",
            legendgroup=name, showlegend=False, hoverinfo="skip",
        ))
    return bands


def lr_sensitivity(summary: pd.DataFrame) -> go.Figure:
    """The best validation metric against the learning rate (log x): a line per configuration but the lr.

    A configuration here is (variant, rank, options): its line joins the mean over seeds of its
    runs' best validation value at each learning rate it ran, in the variant's colour with the
    rank's dash (``rank_dash``), over a band from ``best_low`` to ``best_high`` (the 95% interval
    over seeds) where a run of neighbouring learning rates has one (n >= 2); a lone learning rate
    with an interval gets an error bar instead.

    Args:
        summary: ``wb.summarize``'s table, of one task and one monitor.

    Raises:
        ValueError: a missing column, or configurations of several tasks or monitors.
    """
    monitor = _summary_monitor(summary, SUMMARY_COLUMNS)
    metric = _metric_label(monitor)
    lrs, means = _numbers(summary, "lr"), _numbers(summary, "best_mean")
    table = summary[(lrs > 0) & np.isfinite(means)]
    figure = go.Figure()
    for variant in _variant_order(table["variant"]):
        mine = table[table["variant"] == variant]
        for (rank, options), points in mine.groupby(["rank", "options"], sort=True, dropna=False):
            points = points.sort_values("lr", kind="stable")
            x, mean, low, high = (_numbers(points, c) for c in ("lr", "best_mean", "best_low", "best_high"))
            name, color = configuration_name(variant, rank, None, options), variant_color(variant)
            for band in _band(x, low, high, name, color):
                figure.add_trace(band)
            lone = np.zeros(len(x), dtype=bool)
            for part in _segments(np.isfinite(low) & np.isfinite(high)):
                lone[part] = part.size == 1
            figure.add_trace(go.Scatter(
                x=x, y=mean, mode="lines+markers", name=name, legendgroup=name,
                line={"color": color, "dash": rank_dash(rank, table["rank"])}, marker={"color": color, "size": 7},
                error_y={"type": "data", "symmetric": False, "array": np.where(lone, high - mean, np.nan),
                         "arrayminus": np.where(lone, mean - low, np.nan), "color": color, "width": 4},
                customdata=np.column_stack([points["n"].astype(str), _interval_text(low, high)]),
                hovertemplate=(f"{name}<br>lr %{{x:.3g}}<br>best {metric} %{{y:.4g}} (mean of %{{customdata[0]}} "
                               "seed(s))<br>%{customdata[1]}<extra></extra>"),
            ))
    figure.update_layout(title=f"Best {metric} against the learning rate (mean over seeds; bands: 95% interval)",
                         xaxis={"title": "learning rate", "type": "log"}, yaxis_title=f"best {metric}",
                         legend_title_text="configuration (dash: rank)", template=TEMPLATE)
    return figure


# -- runs and their logged curves ----------------------------------------------------------------


def _flagged(runs: pd.DataFrame | None, series: pd.DataFrame, mode: str) -> dict[str, str]:
    """The runs left out of the means (and off the axis), with why: diverged (by ``runs``' status, if
    given), values that are not finite, or (losses) blown up."""
    flagged = {} if runs is None else {run: "diverged" for run in runs.loc[runs["status"] == "diverged", "run"]}
    values = pd.to_numeric(series["value"], errors="coerce")
    for run in series.loc[~np.isfinite(values.to_numpy(dtype=float)), "run"].unique():
        flagged.setdefault(run, "values not finite")
    if mode == "min":  # an accuracy cannot blow up; a loss far above where the runs started has
        kept = series[~series["run"].isin(flagged)]
        start = float(np.median(np.abs(pd.to_numeric(kept.groupby("run")["value"].first())))) if len(kept) else 0.0
        if start > 0:
            peaks = pd.to_numeric(kept["value"]).abs().groupby(kept["run"]).max()
            for run in peaks.index[peaks > BLOWUP * start]:
                flagged[run] = f"above {BLOWUP:g}x the median first value"
    return flagged


def _flag_note(flagged: dict[str, str], fate: str = "left out of the means", most: int = 8) -> str:
    """The note ``flagged, <fate>: run (why), ...`` naming at most ``most`` runs."""
    listed = [f"{run} ({why})" for run, why in sorted(flagged.items())]
    more = f", and {len(listed) - most} more" if len(listed) > most else ""
    return f"flagged, {fate}: {', '.join(listed[:most])}{more}"


def validation_bands(runs: pd.DataFrame, metrics: pd.DataFrame, metric: str = "loss", split: str = "val",
                     band: str = "range") -> go.Figure:
    """Small multiples, one subplot per variant (shared y): a mean curve per configuration over its seeds, banded.

    Within a variant's subplot a configuration is (rank, lr, options): its line is the mean, at each
    logged step, of the ``split`` ``metric`` of its runs (the seeds logged at that step), over a band
    (``band``: ``"range"``, min to max over those seeds, or ``"interval"``, the 95% t interval of
    their mean). Colour: the variant's; dash: the rank's; shade: the configuration's place among
    the variant's configurations of that rank, by lr (palest: the smallest). Legend entries name
    configurations and their number of seeds. The y axis is logarithmic for a loss whose values are
    all positive. Runs that diverged (status ``"diverged"``), logged a value that is not finite, or
    (for a loss) rose above ``BLOWUP`` times the runs' median first value are left out of the means
    and listed as flagged under the title, so they do not stretch the axis.

    Args:
        runs: ``load_runs``' table (the runs to draw): run, variant, rank, lr, options, status.
        metrics: ``load_metrics``' table: run, step, split, metric, value.
        metric: the metric's logged name, e.g. ``"loss"`` or ``"acc"``.
        split: ``"val"`` (every evaluation), or ``"train"``.
        band: ``"range"`` or ``"interval"``.

    Raises:
        ValueError: a missing column, or an unknown ``band`` (the message names the valid ones).
    """
    if band not in BANDS:
        raise ValueError(f"band must be one of {', '.join(f'{k!r} ({v})' for k, v in BANDS.items())}, not {band!r}")
    require_columns(runs, ("run", "variant", "rank", "lr", "options", "status"), "runs")
    series = _series(metrics, split, metric, list(runs["run"]))
    series = series.assign(value=pd.to_numeric(series["value"], errors="coerce"))
    mode, label = metric_mode(metric), _metric_label(f"{split}_{metric}")
    flagged = _flagged(runs, series, mode)
    logged = runs[runs["run"].isin(series["run"])].assign(options=lambda t: t["options"].fillna(""))
    kept = logged[~logged["run"].isin(flagged)]
    variants = _variant_order(logged["variant"])
    columns = max(1, min(len(variants), 3))
    rows = max(1, math.ceil(len(variants) / columns))
    titles = [v if v in set(kept["variant"]) else f"{v}: every run flagged" for v in variants]
    figure = make_subplots(rows=rows, cols=columns, shared_yaxes="all", subplot_titles=titles or None,
                           horizontal_spacing=0.04, vertical_spacing=0.3 / rows)
    hover = (f"%{{fullData.name}}<br>step %{{x}}<br>mean {label} %{{y:.4g}} over %{{customdata[0]}} seed(s)<br>"
             f"{BANDS[band]}: %{{customdata[1]:.4g}} to %{{customdata[2]:.4g}}<extra></extra>")
    for number, variant in enumerate(variants):
        row, column = number // columns + 1, number % columns + 1
        color = variant_color(variant)
        mine = kept[kept["variant"] == variant]
        for rank, same_rank in mine.groupby("rank", sort=True, dropna=False):
            configurations = list(same_rank.groupby(["lr", "options"], sort=True))
            for index, ((lr, options), members) in enumerate(configurations):
                table = (series[series["run"].isin(members["run"])].groupby(["step", "run"])["value"].last()
                         .unstack("run"))
                steps, values = table.index.to_numpy(), table.to_numpy(dtype=float)
                seeds, mean = (~np.isnan(values)).sum(axis=1), np.nanmean(values, axis=1)
                if band == "range":
                    low, high = np.nanmin(values, axis=1), np.nanmax(values, axis=1)
                else:
                    low, high = np.array([interval(step_values)[2:] for step_values in values]).reshape(-1, 2).T
                seeds_run = members["run"].nunique()
                name = f"{configuration_name(variant, rank, lr, options)} ({seeds_run} seed{'s' * (seeds_run != 1)})"
                shade = _shade(color, index, len(configurations))
                for trace in _band(steps, low, high, name, shade):
                    figure.add_trace(trace, row=row, col=column)
                figure.add_trace(go.Scatter(
                    x=steps, y=mean, mode="lines", name=name, legendgroup=name,
                    line={"color": shade, "dash": rank_dash(rank, kept["rank"]), "width": 2},
                    customdata=np.column_stack([seeds, low, high]), hovertemplate=hover,
                ), row=row, col=column)
    if mode == "min" and len(kept) and (series.loc[series["run"].isin(kept["run"]), "value"] > 0).all():
        figure.update_yaxes(type="log")
    figure.update_xaxes(title_text="step", row=rows)
    figure.update_yaxes(title_text=f"{label} (mean over seeds)", col=1)
    title = f"{label[0].upper()}{label[1:]} by variant: mean over each configuration's seeds (band: {BANDS[band]})"
    if flagged:
        title += f"<br><sup>{_flag_note(flagged)}</sup>"
    figure.update_layout(title=title, legend_title_text="configuration (dash: rank)", template=TEMPLATE,
                         height=max(420, 300 * rows + 120), margin={"t": 110 if flagged else 80})
    return figure
