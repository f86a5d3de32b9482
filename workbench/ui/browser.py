"""``CheckpointBrowser``: the checkpoints of a run (or of every run in a directory) as a table.

Select one to load it into its model, evaluate it on the validation and test splits, merge its
adapters, export it in peft's format, delete it, draw the singular values of its adapters' updates
or reduce their rank (a truncated SVD, kept as a new run beside the source run). The best
checkpoint (by each run's monitor, a validation metric) is highlighted. Every action calls the
public API (``import workbench as wb``); a failed button action shows its error in the panel's
status line instead of a traceback. The spectrum is drawn in the panel's one plotly FigureWidget,
made on the first click (it carries plotly.js, megabytes) and redrawn in place afterwards.
"""

from __future__ import annotations

import html
import os
from pathlib import Path
from typing import Any

import ipywidgets as widgets
import pandas as pd
import plotly.graph_objects as go
import torch
from torch import nn

import workbench as wb

from .panel import BEST_STYLE, Panel, catching, export_typed, html_table, redraw, row, show

RUN_BEST_STYLE = "background:#fff3bf"
SELECTED_STYLE = "outline:2px solid #1c7ed6"
_BASE_COLUMNS = ("run", "step", "path", "stage", "size", "created")
REDUCTION_COLUMNS = ("layer", "old_rank", "new_rank", "kept_energy", "relative_error")
EVALUATION_COLUMNS = ("run", "step", "path", "val_loss", "val_acc", "test_loss", "test_acc")
SORTS = (("run, then step", "run"), ("step", "step"), ("best first", "best"))  # the table's orders


def selection_metric(settings: dict[str, Any]) -> tuple[str, str]:
    """The (metric, mode) that chooses a run's best checkpoint: its monitor if that is a
    validation metric, else the validation loss (never training or test data)."""
    monitor = settings.get("monitor", "val_loss")
    if not str(monitor).startswith("val_"):
        return "val_loss", wb.selection.metric_mode("val_loss")
    return monitor, wb.selection.resolve_mode(monitor, settings.get("mode"))


class CheckpointBrowser(Panel):
    """A panel over the checkpoints of one run, or of every run in a directory.

    Args:
        run_or_runs_dir: a run directory (with config.json) or a directory of runs.
        task: the runs' task when it is not a built-in one (the ``wb.tasks.Task`` they trained on),
            to rebuild their models and data; built-in tasks are rebuilt from their names.

    Attributes:
        checkpoints: the table shown, ``wb.load_checkpoints``' (run, step, path, stage, size,
            created, val_loss, val_acc, ...), plus ``best`` ("best", "run best" or "").
        best: the best checkpoint over all runs by their monitor (``wb.best_checkpoint``), or
            None (no checkpoint has the metric yet, or the runs monitor different metrics).
        run_best: each run's best checkpoint, by run name.
        model: the model ``load()`` (or ``merge()``) loaded, else None; ``loaded`` its checkpoint.
        evaluation: the last ``evaluate()``'s metrics.
        stages: ``wb.compression_stages``' table when the directory holds a compressed model's stage
            runs (``wb.compress_task``: svd, rank-reduced, finetuned), shown side by side above the
            checkpoints (parameters, checkpoint size, metrics); else an empty table.
        reduced, reduction: the checkpoint the last ``reduce()`` wrote and its per-layer table
            (layer, old_rank, new_rank, kept_energy, relative_error), else None.
        shown_spectrum, effective_ranks: the last ``spectrum()``'s table (``wb.spectrum``) and
            each layer's effective rank at the energy box's value (``wb.effective_rank``), else None.
        figure: the ``go.FigureWidget`` the spectrum is drawn in; None until the first ``spectrum()``.
        shown: the rows listed (``run_filter``'s run, in ``sort_by``'s order: run then step, step, or
            best first); the best is also named above the table, and "Select best" selects it.
        evaluations: every ``evaluate()`` so far, one row per checkpoint (run, step, path, val_loss,
            val_acc, test_loss, test_acc), shown in ``evaluations_table``.
        run_filter, sort_by, best_button, evaluations_table, merged_button ("Save merged model":
            ``export(format="merged")``): more widgets; ``selector`` is a list whose rows are clicked.
            Selecting another checkpoint clears the spectrum and reduction shown for the previous one;
            deleting selects the next row, not the best.
        selector, table, stages_table, status, details, load_button, evaluate_button, merge_button, export_to,
        export_button, merged_button, delete_button, refresh_button, reduce_mode, reduce_rank, reduce_energy,
        reduce_button, spectrum_button, widget: the widgets (``widget`` holds them all; ``details``
        shows the last reduction's or spectrum's table).

    Raises:
        ValueError: the path is no run and no directory of runs.

    Example::

        browser = wb.ui.CheckpointBrowser("runs")
        browser.select(browser.best); browser.evaluate()
        browser.spectrum()            # singular values and effective ranks of its adapters
        browser.reduce(energy=0.9)    # -> runs/<run>-reduced-e0.9, a checkpoint of stage "rank-reduced"
    """

    def __init__(self, run_or_runs_dir: str | os.PathLike[str], task: wb.Task | None = None) -> None:
        self.path = Path(run_or_runs_dir)
        self.task = task
        if wb.load_runs(self.path).empty:
            raise ValueError(f"{self.path} is no run and holds no run: neither it nor its subdirectories have a "
                             "config.json (a run directory written by wb.Run, wb.train or wb.sweep)")
        self.checkpoints = pd.DataFrame(columns=[*_BASE_COLUMNS, "best"])
        self.stages = pd.DataFrame()
        self.best: Path | None = None
        self.run_best: dict[str, Path] = {}
        self.model: nn.Module | None = None
        self.loaded: Path | None = None
        self.evaluation: dict[str, float] = {}
        self.reduced: Path | None = None
        self.reduction: pd.DataFrame | None = None
        self.shown_spectrum: pd.DataFrame | None = None
        self.effective_ranks: pd.Series | None = None
        self.figure: go.FigureWidget | None = None
        self._run_paths: dict[str, Path] = {}
        self._criterion = ""
        self._armed: str | None = None
        self._quiet = False

        self.evaluations = pd.DataFrame(columns=list(EVALUATION_COLUMNS))
        self.selector = widgets.Select(rows=8, layout=widgets.Layout(width="auto"),  # no label: as wide as the panel
                                       tooltip="click a checkpoint to select it")
        self.run_filter = widgets.Dropdown(description="run", options=[("all runs", "")], value="",
                                           layout=widgets.Layout(width="auto"))
        self.sort_by = widgets.Dropdown(description="sort by", options=SORTS, value="run",
                                        layout=widgets.Layout(width="auto"))
        self.best_button = widgets.Button(description="Select best", icon="star", layout=widgets.Layout(width="auto"),
                                          tooltip="select the best checkpoint (by validation)")
        self.table = widgets.HTML()
        self.evaluations_table = widgets.HTML()
        self.status = widgets.HTML()
        self.summary = widgets.HTML()
        self.stages_table = widgets.HTML()
        button = {"layout": widgets.Layout(width="auto")}
        self.load_button = widgets.Button(description="Load", icon="upload", tooltip="load into the model", **button)
        self.evaluate_button = widgets.Button(description="Evaluate", icon="check",
                                              tooltip="measure on the val and test splits", **button)
        self.merge_button = widgets.Button(description="Merge", icon="compress",
                                           tooltip="fold the adapters into the base weights", **button)
        self.delete_button = widgets.Button(description="Delete", icon="trash", button_style="danger",
                                            tooltip="delete this checkpoint (click twice)", **button)
        self.refresh_button = widgets.Button(description="Refresh", icon="refresh", **button)
        self.export_to = widgets.Text(description="export to", placeholder="a new or empty directory",
                                      layout=widgets.Layout(width="360px"))
        self.export_button = widgets.Button(description="Export (PEFT)", icon="download",
                                            tooltip=wb.runs.EXPORT_FORMATS["peft"], **button)
        self.merged_button = widgets.Button(description="Save merged model", icon="save",
                                            tooltip=wb.runs.EXPORT_FORMATS["merged"], **button)
        self.details = widgets.HTML()
        self.reduce_mode = widgets.Dropdown(options=("rank", "energy"), value="rank", description="reduce to",
                                            layout=widgets.Layout(width="180px"))
        self.reduce_rank = widgets.IntText(value=2, description="rank", layout=widgets.Layout(width="140px"))
        self.reduce_energy = widgets.FloatText(value=0.9, step=0.05, description="energy",
                                               tooltip="fraction of the sum of squared singular values to keep",
                                               layout=widgets.Layout(width="160px"))
        self.reduce_button = widgets.Button(description="Reduce rank", icon="scissors",
                                            tooltip="truncated SVD of the adapters, saved as a new run", **button)
        self.spectrum_button = widgets.Button(description="Spectrum", icon="bar-chart",
                                              tooltip="singular values of each adapter's update", **button)
        self._figure_box = widgets.VBox()

        self.load_button.on_click(catching(self.status, self.load))
        self.evaluate_button.on_click(catching(self.status, self.evaluate))
        self.merge_button.on_click(catching(self.status, self.merge))
        self.export_button.on_click(catching(self.status, self.export))
        self.merged_button.on_click(catching(self.status, lambda: self.export(format="merged")))
        self.delete_button.on_click(catching(self.status, self._delete_clicked))
        self.refresh_button.on_click(catching(self.status, self.refresh))
        self.reduce_button.on_click(catching(self.status, self.reduce))
        self.spectrum_button.on_click(catching(self.status, self.spectrum))
        self.selector.observe(catching(self.status, self._selection_changed), names="value")
        self.run_filter.observe(catching(self.status, self._view_changed), names="value")
        self.sort_by.observe(catching(self.status, self._view_changed), names="value")
        self.best_button.on_click(catching(self.status, self._select_best))

        self.widget = widgets.VBox([
            self.summary, self.stages_table,
            row(self.run_filter, self.sort_by, self.best_button, self.refresh_button),
            self.table, self.selector,
            row(self.load_button, self.evaluate_button, self.merge_button, self.delete_button),
            row(self.export_to, self.export_button, self.merged_button),
            row(self.reduce_mode, self.reduce_rank, self.reduce_energy, self.reduce_button, self.spectrum_button),
            self.status, self.evaluations_table, self.details, self._figure_box,
        ])
        self.refresh()

    # -- reading ------------------------------------------------------------------------------

    def refresh(self) -> None:
        """Read the checkpoints again (runs still being written show what they have) and redraw."""
        runs = wb.load_runs(self.path)
        self.stages = wb.compression_stages(runs)
        self._run_paths = {run: Path(path) for run, path in zip(runs["run"], runs["path"], strict=True)}
        criteria = {run: selection_metric(wb.run_settings(path)) for run, path in self._run_paths.items()}
        self.run_best = {}
        for run, (metric, mode) in criteria.items():
            try:
                self.run_best[run] = wb.best_checkpoint(self._run_paths[run], metric, mode)
            except ValueError:  # no checkpoint records the metric yet
                continue
        shared = set(criteria.values())
        self.best = None
        self._shared = shared.pop() if len(shared) == 1 else None
        if self._shared is not None and self.run_best:
            metric, mode = self._shared
            self.best = wb.best_checkpoint(self.path, metric, mode)
            self._criterion = f"best by {metric} ({wb.selection.direction(mode)})"
        else:
            self._criterion = "the runs monitor different metrics: each run's best is marked"
        table = wb.load_checkpoints(self.path)
        best_paths = {str(path) for path in self.run_best.values()}
        table["best"] = ["best" if self.best is not None and path == str(self.best) else
                         "run best" if path in best_paths else "" for path in table["path"]]
        self.checkpoints = table.reset_index(drop=True)
        self._disarm()
        self._quiet = True
        try:
            kept = self.run_filter.value if self.run_filter.value in self._run_paths else ""
            self.run_filter.options = [("all runs", ""), *((run, run) for run in self._run_paths)]
            self.run_filter.value = kept
        finally:
            self._quiet = False
        self._fill(self.selector.value)
        show(self.status, f"{len(self.checkpoints)} checkpoint(s) in {len(self._run_paths)} run(s)")

    @property
    def shown(self) -> pd.DataFrame:
        """The checkpoints the table and the selector list: of the run chosen in ``run_filter`` (all by
        default), in ``sort_by``'s order (by run then step; by step; or best first by the runs' shared
        monitor, else by validation loss)."""
        table = self.checkpoints
        if self.run_filter.value:
            table = table[table["run"] == self.run_filter.value]
        if self.sort_by.value == "step":
            return table.sort_values(["step", "run"], kind="stable")
        if self.sort_by.value == "best":
            metric, mode = self._ranking
            if metric in table:
                return table.sort_values(metric, ascending=mode == "min", kind="stable", na_position="last")
        return table

    @property
    def _ranking(self) -> tuple[str, str]:
        """(metric, mode) the list shows and sorts best first by: the runs' shared monitor, else the validation loss."""
        return self._shared or ("val_loss", wb.selection.metric_mode("val_loss"))

    def _fill(self, wanted: str | None) -> None:
        """List ``shown`` in the selector, keeping ``wanted`` selected if listed (else the best, else the last)."""
        options = [(self._label(row), row["path"]) for _, row in self.shown.iterrows()]
        paths = [path for _, path in options]
        fallback = str(self.best) if self.best is not None and str(self.best) in paths else (
            paths[-1] if paths else None)
        self._quiet = True
        try:
            self.selector.options = options
            self.selector.value = wanted if wanted in paths else fallback
        finally:
            self._quiet = False
        self._draw()

    def _view_changed(self, _: Any = None) -> None:
        if not self._quiet:
            self._fill(self.selector.value)

    def _select_best(self) -> None:
        if self.best is None:
            raise ValueError(f"no best checkpoint: {self._criterion}" if self._shared is None else
                             "no checkpoint has the monitor's value yet")
        self.run_filter.value = ""
        self.select(self.best)

    def _label(self, row: pd.Series) -> str:
        stage = f" [{row['stage']}]" if isinstance(row["stage"], str) and row["stage"] else ""
        mark = f" ({row['best']})" if row["best"] else ""
        metric = self._ranking[0]
        value = f", {metric} {row[metric]:.4g}" if metric in row and pd.notna(row[metric]) else ""
        return f"{row['run']} / step {row['step']}{value}{stage}{mark}"

    def _draw(self) -> None:
        selected = self.selector.value
        metrics = [c for c in self.checkpoints.columns if c not in (*_BASE_COLUMNS, "best")]
        columns = ["run", "step", "stage", "size", *metrics, "best"]

        def style(row: pd.Series) -> str:
            styles = {"best": BEST_STYLE, "run best": RUN_BEST_STYLE}.get(row["best"], "")
            return styles + (";" + SELECTED_STYLE if row["path"] == selected else "")

        self.table.value = html_table(self.shown, columns, style, key="path")
        shown = [c for c in self.stages.columns if c not in ("run", "path")]
        self.stages_table.value = ("<b>compression stages</b>" + html_table(self.stages, shown)
                                   if len(self.stages) else "")
        best = ""
        if self.best is not None:
            row = self.checkpoints.loc[self.checkpoints["path"] == str(self.best)].iloc[0]
            metric = self._shared[0]
            best = (f"<br><span style=\"{BEST_STYLE}\">best: {html.escape(row['run'])} / step {row['step']}, "
                    f"{metric} {row[metric]:.4g}</span>")
        self.summary.value = (f"<b>{html.escape(str(self.path))}</b>: {len(self.checkpoints)} checkpoint(s); "
                              f"highlighted: {html.escape(self._criterion)} (validation only){best}")
        self.evaluations_table.value = ("<b>evaluations</b>" + html_table(self.evaluations, EVALUATION_COLUMNS[:2] +
                                                                          EVALUATION_COLUMNS[3:])
                                        if len(self.evaluations) else "")

    def _selection_changed(self, _: Any = None) -> None:
        """Another checkpoint chosen: the spectrum and reduction shown were of the previous one, so they go."""
        if self._quiet:
            return
        self._disarm()
        self.details.value = ""
        self._figure_box.children = ()
        self.shown_spectrum = self.effective_ranks = self.reduction = None
        self._draw()

    # -- selection ----------------------------------------------------------------------------

    def select(self, path_or_step: int | str | os.PathLike[str]) -> Path:
        """Select a checkpoint by its path, or by its step (when only one run has that step); returns its path.

        Raises:
            ValueError: no such checkpoint, or a step that several runs have.
        """
        paths = self.checkpoints["path"]
        if isinstance(path_or_step, int) and not isinstance(path_or_step, bool):
            matches = self.checkpoints[self.checkpoints["step"] == path_or_step]
            if len(matches) > 1:
                raise ValueError(f"step {path_or_step} is in several runs ({', '.join(matches['run'])}): "
                                 "select by the checkpoint's path")
            if matches.empty:
                steps = ", ".join(str(s) for s in sorted(set(self.checkpoints["step"])))
                raise ValueError(f"no checkpoint of step {path_or_step}; steps: {steps or 'none yet'}")
            path = matches["path"].iloc[0]
        else:
            wanted = Path(path_or_step).resolve()
            found = [p for p in paths if Path(p).resolve() == wanted]
            if not found:
                raise ValueError(f"{path_or_step} is not one of the checkpoints listed; refresh() if it is new, "
                                 f"or choose from: {', '.join(paths) or 'none yet'}")
            path = found[0]
        self.selector.value = path
        return Path(path)

    def _selected(self) -> Path:
        if self.selector.value is None:
            raise ValueError("no checkpoint selected: the runs have no checkpoints yet (refresh when they do)")
        return Path(self.selector.value)

    def _run_of(self, checkpoint: Path) -> Path:
        run = self.checkpoints.loc[self.checkpoints["path"] == str(checkpoint), "run"].iloc[0]
        return self._run_paths[run]

    # -- actions ------------------------------------------------------------------------------

    def load(self) -> nn.Module:
        """Load the selected checkpoint into a fresh copy of its run's model (``wb.load_run_model``)."""
        path = self._selected()
        show(self.status, f"loading {path} ...")
        self.model, progress = wb.load_run_model(path, self.task)
        self.loaded = path
        show(self.status, f"loaded {path.name} of {self._run_of(path).name} (step {progress['step']}, "
                          f"{wb.trainable_parameters(self.model):,} trainable parameters) into .model")
        return self.model

    def evaluate(self) -> dict[str, float]:
        """Measure the selected checkpoint on the val and test splits (``wb.evaluate_checkpoint``).

        Returns ``{"val_loss", "val_acc", "test_loss", "test_acc"}``. Choose checkpoints on
        validation; the test figures are for reporting the one chosen.
        """
        path = self._selected()
        show(self.status, f"evaluating {path.name} on val and test ...")
        val, test = (wb.evaluate_checkpoint(path, split, self.task) for split in ("val", "test"))
        self.evaluation = {**val, **test}
        row = self.checkpoints.loc[self.checkpoints["path"] == str(path)].iloc[0]
        added = pd.DataFrame([{"run": row["run"], "step": row["step"], "path": str(path), **self.evaluation}])
        kept = self.evaluations[self.evaluations["path"] != str(path)]
        self.evaluations = pd.concat([kept, added], ignore_index=True) if len(kept) else added
        self._draw()
        text = ", ".join(f"{name} {value:.4g}" for name, value in self.evaluation.items())
        show(self.status, f"{self._run_of(path).name} / {path.name}: {text}")
        return self.evaluation

    def merge(self) -> float:
        """Merge the adapters of the loaded model (loading the selected checkpoint first if needed).

        Returns the largest absolute difference between the merged and unmerged outputs on one
        validation batch: ``max |f_merged(x) - f(x)|``, float rounding only (about 1e-6).
        """
        path = self._selected()
        if self.model is None or self.loaded != path:
            self.load()
        settings = wb.run_settings(self._run_of(path))
        inputs, _ = next(iter(wb.tasks.get_task(settings["task"]).loaders(settings["seed"])["val"]))
        model = self.model.eval()
        with torch.no_grad():
            unmerged = wb.unmerge_adapters(model)(inputs)
            merged = wb.merge_adapters(model)(inputs)
        difference = float((merged - unmerged).abs().max())
        show(self.status, f"merged the adapters of {path.name} in .model: max |merged - unmerged| output on a "
                          f"validation batch of {len(inputs)} = {difference:.3g}")
        return difference

    def export(self, to: str | os.PathLike[str] | None = None, format: str = "peft") -> Path:
        """Export the selected checkpoint (``wb.export_checkpoint``) to ``to``, default the directory typed
        in ``export_to``: its adapter in peft's format, or with ``format="merged"`` the merged model
        (the "Save merged model" button). Returns the directory.

        Raises:
            ValueError: no directory given, or as ``wb.export_checkpoint`` (a directory that is not
                new or empty, a format that does not fit the run).
        """
        out, message = export_typed(self._selected(), self.export_to, to, format, self.task)
        show(self.status, message)
        return out

    def delete(self) -> None:
        """Delete the selected checkpoint (``wb.delete_checkpoint``) and refresh the table.

        Raises:
            wb.CheckpointError: another process or run holds the checkpoints' lock; nothing is deleted.
        """
        path = self._selected()
        listed = self.shown["path"].tolist()
        at = listed.index(str(path))
        neighbours = listed[at + 1:] + listed[:at][::-1]  # the next row, else the one before
        wb.delete_checkpoint(path)
        self.evaluations = self.evaluations[self.evaluations["path"] != str(path)]
        self.refresh()
        if neighbours and neighbours[0] in set(self.shown["path"]):
            self.selector.value = neighbours[0]  # the selection stays where it was, not on the best
        show(self.status, f"deleted {path}")

    def _delete_clicked(self) -> None:
        """The first click arms the Delete button; a second click on the same selection deletes."""
        selected = self.selector.value
        if selected is None or self._armed != selected:
            self._selected()
            self._armed = selected
            self.delete_button.description = "Confirm delete"
            show(self.status, f"click 'Confirm delete' to delete {selected}", error=True)
            return
        self._disarm()
        self.delete()

    def _disarm(self) -> None:
        self._armed = None
        self.delete_button.description = "Delete"

    def reduce(self, rank: int | None = None, energy: float | None = None) -> Path:
        """Reduce the selected checkpoint's adapters to a lower rank and keep the result as a new run.

        ``wb.reduce_checkpoint`` writes the run ``<runs dir>/<run>-reduced-r<rank>`` (or
        ``-e<energy>``) beside the selected checkpoint's run, with one checkpoint of stage
        "rank-reduced" holding its validation metrics; the table is refreshed and ``details``
        shows the per-layer ranks, kept energy and relative error. Give ``rank`` (every layer
        to r', see ``wb.reduce_rank``) or ``energy`` (per layer, the smallest rank keeping
        that fraction of sum s_i^2); with neither, the panel's ``reduce_mode`` and its box decide.

        Returns:
            The new checkpoint's path (also ``reduced``; the per-layer table is ``reduction``).

        Raises:
            ValueError: both rank and energy, vera adapters, a rank above a layer's or below 1,
                energy out of (0, 1], or the new run's directory holds a run already.
        """
        path = self._selected()
        if rank is not None and energy is not None:
            raise ValueError("give rank= or energy=, not both")
        if rank is None and energy is None:
            rank, energy = ((self.reduce_rank.value, None) if self.reduce_mode.value == "rank"
                            else (None, self.reduce_energy.value))
        source = self._run_of(path)
        out = source.parent / f"{source.name}-reduced-{f'r{rank}' if rank is not None else f'e{energy:g}'}"
        show(self.status, f"reducing {path.name} of {source.name} ...")
        self.reduced, self.reduction = wb.reduce_checkpoint(path, out, rank=rank, energy=energy, task=self.task)
        self.refresh()
        reduced = wb.load_checkpoints(out).iloc[0]
        before = self.checkpoints.loc[self.checkpoints["path"] == str(path)].iloc[0]
        compared = ", ".join(f"{metric} {before[metric]:.4g} -> {reduced[metric]:.4g}"
                             for metric in ("val_loss", "val_acc") if metric in reduced and metric in before)
        where = "" if str(self.reduced) in set(self.checkpoints["path"]) else (
            f" (beside this run: wb.ui.CheckpointBrowser({str(out.parent)!r}) lists both)")
        self.details.value = (f"<b>{html.escape(source.name)} / {html.escape(path.name)}</b> reduced into "
                              f"<b>{html.escape(out.name)}</b>:" + html_table(self.reduction, REDUCTION_COLUMNS))
        show(self.status, f"reduced {path.name} of {source.name} into the run {out.name}{where}: {compared}")
        return self.reduced

    def spectrum(self) -> pd.DataFrame:
        """Draw the singular values of the selected checkpoint's adapter updates, and their effective ranks.

        ``wb.plots.spectrum(wb.spectrum(checkpoint))``, in the panel's one figure; ``details`` and
        the status line give each layer's effective rank at the energy in ``reduce_energy``: the
        smallest r' with sum_{i<=r'} s_i^2 >= energy * sum_i s_i^2 (what ``reduce(energy=...)`` keeps).

        Returns:
            ``wb.spectrum``'s table (layer, index, value, energy), also ``shown_spectrum``.

        Raises:
            ValueError: the energy box is out of (0, 1].
        """
        path = self._selected()
        energy = self.reduce_energy.value
        table = wb.spectrum(path, self.task)
        ranks = wb.effective_rank(table, energy)
        name = f"{self._run_of(path).name} / {path.name}"
        figure = wb.plots.spectrum(table, energy).update_layout(title=f"Spectrum of {name}")
        if self.figure is None:
            self.figure = go.FigureWidget(figure)
        else:
            redraw(self.figure, figure)
        self._figure_box.children = (self.figure,)  # hidden again when another checkpoint is selected
        layers = table.groupby("layer", sort=False)["value"]
        summary = pd.DataFrame({"layer": ranks.index, "rank": layers.size().to_numpy(),
                                "largest s": layers.max().to_numpy(), "effective_rank": ranks.to_numpy()})
        self.details.value = (f"<b>{html.escape(name)}</b>: effective rank at energy {energy:g}"
                              + html_table(summary, list(summary.columns)))
        self.shown_spectrum, self.effective_ranks = table, ranks
        listed = ", ".join(f"{layer} {rank}" for layer, rank in ranks.items())
        show(self.status, f"spectrum of {name}; effective ranks at energy {energy:g}: {listed}")
        return table
