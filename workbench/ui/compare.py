"""``Compare``: overlay the validation curves of chosen runs and pick the best checkpoint among them.

Runs are filtered by variant and rank; the chosen ones are drawn in one plotly FigureWidget
(``wb.plots.validation_curves``, markers at the checkpoints) whose data is replaced in place on
every change, above a table of trainable parameters against each run's best validation metric.
Below them, the chosen runs' configurations (``wb.summarize``: mean and interval over seeds):
their Pareto fronts against each cost (``wb.plots.pareto_fronts``) and their best value against
the learning rate (``wb.plots.lr_sensitivity``), each in a FigureWidget of the panel's width.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ipywidgets as widgets
import pandas as pd
import plotly.graph_objects as go

import workbench as wb

from .panel import BEST_STYLE, Panel, catching, export_typed, html_table, redraw, row, show

METRICS = {"loss": "validation loss", "acc": "validation accuracy"}
NO_RANK = 0  # the ranks filter's value for the runs without a rank (the baselines "full" and "head")


def _reselect(select: widgets.SelectMultiple, options: Sequence[tuple[str, Any]]) -> None:
    """Give ``select`` new options, keeping the choice: options it had keep their state, new ones are chosen."""
    before, chosen = {value for _, value in select.options}, set(select.value)
    select.options = list(options)
    select.value = tuple(value for _, value in options if value in chosen or value not in before)


class Compare(Panel):
    """A panel comparing the runs of a directory.

    Args:
        runs_dir: a directory of runs (as ``wb.sweep`` writes), or one run.

    Attributes:
        variants, ranks, lrs: multi-selects that filter the runs offered (the ranks' value ``NO_RANK``,
            labelled "none", passes the baselines, which have no rank).
        runs: a multi-select of the runs drawn (those the filters pass).
        metric: the validation metric drawn and ranked: ``"loss"`` (lowest best) or ``"acc"`` (highest).
        figure: the one ``go.FigureWidget``: a line per chosen run, markers at its checkpoints.
        table: per chosen run (``run_summary``): lr, trainable parameters and its best checkpoint by the
            metric, best first.
        summary: ``wb.summarize`` of the chosen runs (one row per configuration).
        pareto: a ``go.FigureWidget`` of ``wb.plots.pareto_fronts(summary)``: each configuration's
            best value (the runs' monitor) against trainable parameters, peak memory and wall time.
        sensitivity: a ``go.FigureWidget`` of ``wb.plots.lr_sensitivity(summary)``.
        best_button: sets ``best`` (``pick_best``); status: messages and errors.
        best: the best checkpoint over the chosen runs, or None until picked; ``export_best`` (the
            'export to' box, ``export_format`` and "Export best") and ``open_best`` ("Open best in
            browser": ``browser``, shown below) act on it.
        widget: the panel.

    Raises:
        ValueError: ``runs_dir`` is no directory, or holds no run.
    """

    def __init__(self, runs_dir: str | os.PathLike[str]) -> None:
        self.path = Path(runs_dir)
        self.best: Path | None = None
        self.best_row: pd.Series | None = None
        self.run_table = pd.DataFrame()
        self.metrics = pd.DataFrame()
        self.checkpoints = pd.DataFrame()
        self.summary = pd.DataFrame()
        self._quiet = False

        self.variants = widgets.SelectMultiple(description="variants", rows=5)
        self.ranks = widgets.SelectMultiple(description="ranks", rows=5, layout=widgets.Layout(width="180px"))
        self.lrs = widgets.SelectMultiple(description="lrs", rows=5, layout=widgets.Layout(width="180px"))
        self.runs = widgets.SelectMultiple(description="runs", rows=8, layout=widgets.Layout(width="380px"))
        self.metric = widgets.Dropdown(options=[(label, key) for key, label in METRICS.items()], value="loss",
                                       description="metric")
        self.best_button = widgets.Button(description="Pick best", icon="trophy", button_style="success",
                                          tooltip="the best checkpoint of the chosen runs by the metric")
        self.refresh_button = widgets.Button(description="Refresh", icon="refresh")
        self.export_to = widgets.Text(description="export to", placeholder="a new or empty directory",
                                      layout=widgets.Layout(width="320px"))
        self.export_format = widgets.Dropdown(options=list(wb.runs.EXPORT_FORMATS), value="peft",
                                              description="as", layout=widgets.Layout(width="160px"),
                                              tooltip="; ".join(f"{k}: {v}" for k, v in wb.runs.EXPORT_FORMATS.items()))
        self.export_button = widgets.Button(description="Export best", icon="download",
                                            layout=widgets.Layout(width="auto"),
                                            tooltip="export the picked best checkpoint (wb.export_checkpoint)")
        self.open_button = widgets.Button(description="Open best in browser", icon="folder-open",
                                          layout=widgets.Layout(width="auto"),
                                          tooltip="a CheckpointBrowser of the best's run, the best selected, below")
        self.browser: wb.ui.CheckpointBrowser | None = None
        self._browser_box = widgets.VBox()
        self.figure = go.FigureWidget()
        self.table = widgets.HTML()
        self.pareto = go.FigureWidget()
        self.sensitivity = go.FigureWidget()
        self.status = widgets.HTML()

        self.variants.observe(catching(self.status, self._filter), names="value")
        self.ranks.observe(catching(self.status, self._filter), names="value")
        self.lrs.observe(catching(self.status, self._filter), names="value")
        self.export_button.on_click(catching(self.status, self.export_best))
        self.open_button.on_click(catching(self.status, self.open_best))
        self.runs.observe(catching(self.status, self._runs_changed), names="value")
        self.metric.observe(catching(self.status, self._metric_changed), names="value")
        self.best_button.on_click(catching(self.status, self.pick_best))
        self.refresh_button.on_click(catching(self.status, self.refresh))

        self.widget = widgets.VBox([
            row(self.variants, self.ranks, self.lrs, self.runs),
            row(self.metric, self.best_button, self.refresh_button),
            row(self.export_to, self.export_format, self.export_button, self.open_button),
            self.status, self.figure, self.table, self.pareto, self.sensitivity, self._browser_box,
        ])
        self.refresh()

    # -- reading ------------------------------------------------------------------------------

    def refresh(self) -> None:
        """Read the directory again (runs still being written show what they have) and redraw.

        Raises:
            ValueError: the directory is gone or holds no run.
        """
        runs = wb.load_runs(self.path)
        if runs.empty:
            raise ValueError(f"{self.path} holds no run: none of its subdirectories has a config.json "
                             "(a run directory written by wb.Run, wb.train or wb.sweep)")
        self.run_table = runs
        self.metrics = wb.load_metrics(self.path)
        self.checkpoints = wb.load_checkpoints(self.path)
        present = set(runs["variant"])
        variants = [v for v in wb.VARIANTS if v in present] + sorted(present - set(wb.VARIANTS))
        self._quiet = True
        try:
            _reselect(self.variants, [(v, v) for v in variants])
            ranks = [(str(int(r)), int(r)) for r in sorted(set(runs["rank"].dropna()))]
            _reselect(self.ranks, ranks + ([("none", NO_RANK)] if runs["rank"].isna().any() else []))
            _reselect(self.lrs, [(f"{lr:g}", float(lr)) for lr in sorted(set(runs["lr"].dropna()))])
        finally:
            self._quiet = False
        self._filter()
        show(self.status, f"{len(runs)} run(s), {len(self.checkpoints)} checkpoint(s) in {self.path}")

    def _filter(self, _: Any = None) -> None:
        if self._quiet:
            return
        rank, ranks = self.run_table["rank"], self.ranks.value
        passed = rank.isin([r for r in ranks if r != NO_RANK]) | (rank.isna() & (NO_RANK in ranks))
        passed &= self.run_table["lr"].astype(float).isin(self.lrs.value)
        chosen = self.run_table[self.run_table["variant"].isin(self.variants.value) & passed]
        self._quiet = True
        try:
            _reselect(self.runs, [(run, run) for run in chosen["run"]])
        finally:
            self._quiet = False
        self._runs_changed()

    def _runs_changed(self, _: Any = None) -> None:
        if self._quiet:
            return
        if self.best_row is not None and self.best_row["run"] not in self.runs.value:
            self._forget_best()
        self._draw()

    def _metric_changed(self, _: Any = None) -> None:
        if self.best is not None:
            self._forget_best()
            show(self.status, "the metric changed: pick the best again")
        self._draw()

    def _forget_best(self) -> None:
        self.best, self.best_row = None, None

    # -- drawing ------------------------------------------------------------------------------

    def _draw(self) -> None:
        """Replace the figure's traces and layout in place, and rebuild the table."""
        chosen, metric = list(self.runs.value), self.metric.value
        checkpoints = self.checkpoints[self.checkpoints["run"].isin(chosen)]
        best = None
        if self.best_row is not None and f"val_{metric}" in self.best_row:
            best = (self.best_row["run"], self.best_row["step"], self.best_row[f"val_{metric}"])
        figure = wb.plots.validation_curves(self.metrics, metric, runs=chosen, checkpoints=checkpoints, best=best)
        if not chosen:
            figure.update_layout(title="No run chosen: choose runs (or widen the variant and rank filters)")
        redraw(self.figure, figure)
        self.table.value = self._table_html(chosen, metric)
        self._draw_configurations(chosen)

    def _draw_configurations(self, chosen: Sequence[str]) -> None:
        """Summarize the chosen runs and redraw the Pareto fronts and the lr sensitivity from the summary."""
        try:
            self.summary = wb.summarize(self.run_table[self.run_table["run"].isin(chosen)])
            pareto, sensitivity = wb.plots.pareto_fronts(self.summary), wb.plots.lr_sensitivity(self.summary)
        except ValueError as error:  # the chosen runs monitor several metrics, or are of several tasks
            self.summary = pd.DataFrame()
            pareto = go.Figure(layout={"title": f"No Pareto front: {error}", "template": wb.plots.TEMPLATE})
            sensitivity = go.Figure(layout={"title": "No lr sensitivity: choose runs of one task and monitor",
                                            "template": wb.plots.TEMPLATE})
        if not chosen:
            pareto.update_layout(title="No run chosen: no configuration to place against its costs")
            sensitivity.update_layout(title="No run chosen: no configuration to draw against the learning rate")
        redraw(self.pareto, pareto.update_layout(height=430))
        redraw(self.sensitivity, sensitivity.update_layout(height=400))

    def run_summary(self, runs: Sequence[str] | None = None) -> pd.DataFrame:
        """Per run (default: the chosen ones): run, variant, rank, trainable, its best checkpoint's
        ``val_<metric>`` and step by the panel's metric, test_loss, test_acc, status and steps_done (where a
        pruned or stopped run stopped), lr; best first by the metric (runs without it last)."""
        metric, mode = f"val_{self.metric.value}", wb.selection.metric_mode(self.metric.value)
        runs = list(self.runs.value) if runs is None else list(runs)
        table = self.run_table[self.run_table["run"].isin(runs)]
        bests = []
        for run in table["run"]:
            mine = self.checkpoints[self.checkpoints["run"] == run]
            best = wb.selection.best_index(mine[metric], mode) if metric in mine else None
            if best is None:
                bests.append({"run": run, metric: None, "best step": None})
                continue
            row = mine.loc[best]
            bests.append({"run": run, metric: float(row[metric]), "best step": int(row["step"])})
        columns = ["run", "variant", "rank", "lr", "trainable", metric, "best step", "test_loss", "test_acc",
                   "status", "steps_done"]
        # load_runs' own val_<metric> is the monitor's checkpoint's; this table's is the best by the metric
        summary = table.drop(columns=[metric, "best step"], errors="ignore").merge(
            pd.DataFrame(bests, columns=["run", metric, "best step"]), on="run")
        return (summary[columns].sort_values(metric, ascending=mode == "min", kind="stable", na_position="last")
                .reset_index(drop=True))

    def _table_html(self, chosen: Sequence[str], metric: str) -> str:
        if not chosen:
            return "<i>no run chosen</i>"
        summary = self.run_summary(chosen)
        best_run = None if self.best_row is None else self.best_row["run"]
        direction = wb.selection.direction(wb.selection.metric_mode(metric))
        caption = (f"<b>Trainable parameters against the best val_{metric}</b> ({direction}, over each run's "
                   "checkpoints; test figures: on the checkpoint the run's monitor chose)")
        return caption + html_table(summary, list(summary.columns),
                                    lambda row: BEST_STYLE if row["run"] == best_run else "", key="run")

    # -- choosing -----------------------------------------------------------------------------

    def pick_best(self) -> Path:
        """Set ``best`` to the best checkpoint over the chosen runs by the metric, show and highlight it.

        Each run's best is ``wb.best_checkpoint(run, "val_<metric>", mode)``; the best of those
        wins (the first chosen run on a tie).

        Raises:
            ValueError: no run chosen, or none of them has a checkpoint with the metric yet.
        """
        chosen = list(self.runs.value)
        if not chosen:
            raise ValueError("choose at least one run first (the runs box; the variant and rank filters narrow it)")
        metric, mode = f"val_{self.metric.value}", wb.selection.metric_mode(self.metric.value)
        paths = dict(zip(self.run_table["run"], self.run_table["path"], strict=True))
        candidates = []
        for run in chosen:
            try:
                best = wb.best_checkpoint(paths[run], metric, mode)
            except ValueError:  # no checkpoint of this run records the metric yet
                continue
            table = wb.load_checkpoints(paths[run])
            candidates.append(table[table["path"] == str(best)].iloc[0])
        if not candidates:
            raise ValueError(f"none of the chosen runs has a checkpoint with {metric} yet; refresh once they do")
        row = candidates[wb.selection.best_index(enumerate(row[metric] for row in candidates), mode)]
        self.best, self.best_row = Path(row["path"]), row
        self._draw()
        recorded = ", ".join(f"{k} {row[k]:.4g}" for k in row.index if str(k).startswith("val_") and pd.notna(row[k]))
        show(self.status, f"best of {len(chosen)} run(s) by {metric} ({wb.selection.direction(mode)}): "
                          f"{self.best} (run {row['run']}, step {row['step']}: {recorded})")
        return self.best

    def _picked(self) -> Path:
        if self.best is None:
            raise ValueError("pick the best first (Pick best)")
        return self.best

    def export_best(self, to: str | os.PathLike[str] | None = None, format: str | None = None) -> Path:
        """Export the picked best checkpoint (``wb.export_checkpoint``) to ``to`` (default the 'export to'
        box) in ``format`` (default the 'as' box: peft, or merged); returns the directory.

        Raises:
            ValueError: nothing picked yet, no directory given, or as ``wb.export_checkpoint``.
        """
        out, message = export_typed(self._picked(), self.export_to, to, format or self.export_format.value)
        show(self.status, message)
        return out

    def open_best(self) -> wb.ui.CheckpointBrowser:
        """A ``CheckpointBrowser`` of the picked best's run, the best selected, shown below the figures."""
        best = self._picked()
        self.browser = wb.ui.CheckpointBrowser(best.parent.parent)
        self.browser.select(best)
        self._browser_box.children = (self.browser.widget,)
        show(self.status, f"opened {best.parent.parent.name} in the checkpoint browser below, {best.name} selected")
        return self.browser
