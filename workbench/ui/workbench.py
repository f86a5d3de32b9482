"""The main panel: choose a variant and its settings, train in the background, watch the curves live.

``wb.ui.Workbench(task="digits", runs_dir="runs")`` shows the controls, Launch and Stop buttons,
a status line, a progress bar and one live figure. A launch trains one run per chosen rank, one
after the other, each in its own directory ``runs_dir / wb.trial_name(variant, rank, lr, seed)``
(the names ``wb.sweep`` gives), so the panel, the CLI and sweeps share and resume each other's runs.

Threads: ``launch()`` checks the settings and builds every ``wb.Run`` on the calling thread, so
a bad choice is refused in the status line before anything is written; training then runs on a
background thread, which only sets widget values (never ``with output:``). The figure and the
progress bar are redrawn at most every ``DRAW_INTERVAL`` seconds, and once more when a run ends.
"""

from __future__ import annotations

import html
import math
import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ipywidgets as widgets
import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch

import workbench as wb

from .panel import Panel, catching, redraw, show

RANKS = (1, 2, 4, 8, 16, 32, 64)
DRAW_INTERVAL = 0.4  # seconds between two redraws of the figure and the progress bar during a run
SERIES = wb.plots.LIVE_SERIES  # what the figure shows of each run, in the order of its traces
_WIDE = {"description_width": "initial"}


def option_control(name: str, option: wb.adapters.Option) -> widgets.ValueWidget:
    """The control of a variant option, made from its kind, with the option's help as its tooltip.

    A str with choices is a Dropdown of them, a bool a Checkbox, an int an integer box, a float a
    number box, any other str a text box. Values are checked by the library when a run is built.
    """
    common = {"description": name, "tooltip": option.help, "style": _WIDE}
    if option.choices is not None:
        return widgets.Dropdown(options=option.choices, value=option.default, **common)
    if option.kind is bool:
        return widgets.Checkbox(value=option.default, indent=False, **common)
    if option.kind is int:
        return widgets.IntText(value=option.default, **common)
    if option.kind is float:
        return widgets.FloatText(value=option.default, **common)
    return widgets.Text(value=option.default, **common)


def adaptable_modules(task: wb.Task) -> tuple[list[str], list[str]]:
    """(every adaptable module of ``task.base_model()``, the ones ``task.default_targets`` selects).

    Adaptable: what ``wb.add_adapters`` can wrap (``nn.Linear``, transformers ``Conv1D``; tied and
    shared layers left out), as ``wb.find_targets`` resolves it, so the names and the default
    selection are the library's own.

    Raises:
        ValueError: the model has no adaptable module, or the default targets match none.
    """
    with torch.random.fork_rng():
        model = task.base_model()
    every = list(wb.find_targets(model))
    chosen = every if task.default_targets is None else list(wb.find_targets(model, task.default_targets))
    return every, chosen


class _Curves:
    """What the figure shows of one run: steps and values of each series, and the checkpoint steps.

    Filled from the run directory at launch (a resumed or finished run shows its history), then
    appended to by the training thread only.
    """

    def __init__(self, run: Path) -> None:
        self.name = run.name
        self.points: dict[str, tuple[list[int], list[float]]] = {s: ([], []) for s in SERIES[:3]}
        self.saved: list[int] = []
        if wb.runs.is_run(run):
            metrics = wb.load_metrics(run)
            for series in SERIES[:3]:
                split, metric = series.split()
                rows = metrics[(metrics["split"] == split) & (metrics["metric"] == metric)]
                self.points[series] = ([int(s) for s in rows["step"]], [float(v) for v in rows["value"]])
            self.saved = [int(s) for s in wb.load_checkpoints(run).get("step", [])]

    def add(self, series: str, step: int, value: float) -> None:
        steps, values = self.points[series]
        steps.append(step)
        values.append(value)

    def keep_before(self, step: int) -> None:
        """Forget everything from ``step`` on: a resumed run logs those steps again."""
        for series, (steps, values) in self.points.items():
            kept = [i for i, s in enumerate(steps) if s < step]
            self.points[series] = ([steps[i] for i in kept], [values[i] for i in kept])
        self.saved = [s for s in self.saved if s < step]

    def xy(self, series: str) -> tuple[np.ndarray, np.ndarray]:
        """The x (steps) and y of a series; "checkpoints" sit on the validation loss at the saved steps."""
        if series == "checkpoints":
            loss = dict(zip(*self.points["val loss"], strict=True))
            steps = [s for s in self.saved if s in loss]
            return np.array(steps, dtype=np.int64), np.array([loss[s] for s in steps], dtype=np.float64)
        steps, values = self.points[series]
        return np.array(steps, dtype=np.int64), np.array(values, dtype=np.float64)


class _LiveCallback(wb.Callback):
    """The panel's hooks on the training thread: record every point, redraw now and then, honour Stop.

    Args:
        panel: the panel to draw on.
        index: the run's place in the launch: its traces are the figure's ``4 * index`` to ``4 * index + 3``.
        label: how the status line names that place, e.g. "run 1 of 2".
        curves: the run's points so far.
    """

    def __init__(self, panel: Workbench, index: int, label: str, curves: _Curves) -> None:
        self.panel, self.index, self.label, self.curves = panel, index, label, curves
        self.started = False

    def on_step(self, trainer: wb.Trainer, loss: float) -> None:
        if not self.started:  # a resumed run starts after its checkpoint: older points stay, later ones go
            self.started = True
            self.curves.keep_before(trainer.step)
        self.curves.add("train loss", trainer.step, loss)
        if self.panel._stop_requested.is_set():
            trainer.stop()  # also covers a Stop pressed before this trainer began
        if time.monotonic() - self.panel._last_draw >= DRAW_INTERVAL:
            self.panel._show(trainer, self.index, self.label)

    def on_evaluate(self, trainer: wb.Trainer, metrics: dict[str, float]) -> None:
        self.curves.add("val loss", trainer.step, metrics["val_loss"])
        self.curves.add("val acc", trainer.step, metrics["val_acc"])

    def on_save(self, trainer: wb.Trainer, path: Path) -> None:
        self.curves.saved.append(trainer.step)

    def on_end(self, trainer: wb.Trainer) -> None:
        self.panel._show(trainer, self.index, self.label)


class Workbench(Panel):
    """The main notebook panel: settings, Launch / Stop, a status line, a progress bar, a live figure.

    Example::

        panel = wb.ui.Workbench(task="digits", runs_dir="runs")
        panel                       # shows it; or set values in code:
        panel.ranks.value = (2, 8)  # a sweep over ranks: one run each
        panel.launch()
        table = panel.wait()        # wb.load_runs over this launch's run directories

    Args:
        task: a task name of ``wb.tasks.TASKS`` or your own ``wb.tasks.Task``.
        runs_dir: where run directories go (created on the first launch).
        callbacks: more ``wb.Callback`` s for every run (they run on the training thread).

    Attributes:
        variant, ranks, alpha, lr, steps, eval_every, save_every, seed, targets: the controls
            (``ranks`` and ``targets`` are multi-selects; ``alpha`` 0 means alpha = rank).
        options: the variant-specific controls by option name, one for every option of every
            registered variant (``wb.variant_options``), each shown while a variant that has it is
            chosen, with the option's help as its tooltip (``option_control``); a control left as
            it was follows the chosen variant's default. ``init`` is a Dropdown ("default", or
            "pissa": adapters start from the top-r SVD of each weight).
        launch_button, stop_button, status, progress, figure, widget: the rest of the panel;
            ``figure`` is a ``go.FigureWidget`` of ``wb.plots.live_runs``: four traces per run, named
            ``"<run> train loss"``, ``"<run> val loss"``, ``"<run> val acc"`` and
            ``"<run> checkpoints"`` (markers on the validation loss at each saved step).
        last_error: the message of the last refused launch or failed run, else None.

    Raises:
        ValueError: an unknown task name, or a model with no adaptable module.
    """

    def __init__(
        self,
        task: str | wb.Task = "digits",
        runs_dir: str | os.PathLike[str] = "runs",
        callbacks: Sequence[wb.Callback] = (),
    ) -> None:
        self.task = wb.tasks.get_task(task) if isinstance(task, str) else task
        self.runs_dir = Path(runs_dir)
        self.callbacks = list(callbacks)
        self.last_error: str | None = None
        modules, chosen = adaptable_modules(self.task)
        self._default_targets = tuple(chosen)

        variants = wb.variant_names()
        self.variant = widgets.Dropdown(options=variants, value=variants[0], description="variant")
        self.ranks = widgets.SelectMultiple(options=RANKS, value=(8,), rows=len(RANKS), description="rank(s)")
        self.alpha = widgets.FloatText(value=0.0, description="alpha (0 = rank)", style=_WIDE)
        self.lr = widgets.BoundedFloatText(value=3e-3, min=1e-6, max=1.0, step=1e-4, description="learning rate",
                                           style=_WIDE)
        self.steps = widgets.BoundedIntText(value=300, min=1, max=10**7, description="steps")
        self.eval_every = widgets.BoundedIntText(value=50, min=1, max=10**7, description="evaluate every", style=_WIDE)
        self.save_every = widgets.BoundedIntText(value=50, min=1, max=10**7, description="checkpoint every",
                                                 style=_WIDE)
        self.seed = widgets.BoundedIntText(value=0, min=0, max=2**31 - 1, description="seed")
        self.targets = widgets.SelectMultiple(options=modules, value=tuple(chosen), rows=min(len(modules), 8),
                                              description="targets", layout=widgets.Layout(width="auto"))
        first: dict[str, wb.adapters.Option] = {}  # each option as the first variant that has it defines it
        for variant in variants:
            for name, option in wb.variant_options(variant).items():
                first.setdefault(name, option)
        self.options = {name: option_control(name, option) for name, option in first.items()}
        self._untouched = {name: option.default for name, option in first.items()}  # each control's value unedited
        self.launch_button = widgets.Button(description="Launch", button_style="primary", icon="play")
        self.stop_button = widgets.Button(description="Stop", button_style="warning", icon="stop", disabled=True)
        self.status = widgets.HTML(value="Choose the settings and press Launch.")
        self.progress = widgets.IntProgress(value=0, min=0, max=1, description="progress")
        self.figure = go.FigureWidget(wb.plots.live_runs([]))  # a launch puts its runs' traces in (_reset_figure)

        settings = widgets.VBox([self.variant, self.alpha, *self.options.values(), self.lr, self.seed])
        schedule = widgets.VBox([self.steps, self.eval_every, self.save_every, self.ranks])
        header = widgets.HTML(f"<b>Adapter workbench</b>: task <code>{html.escape(self.task.name)}</code>, "
                              f"runs in <code>{html.escape(str(self.runs_dir))}</code>")
        self.widget = widgets.VBox([
            header, widgets.HBox([settings, schedule, self.targets]),
            widgets.HBox([self.launch_button, self.stop_button, self.progress]), self.status, self.figure,
        ])

        self._thread: threading.Thread | None = None
        self._current: wb.Run | None = None
        self._paths: list[Path] = []
        self._curves: list[_Curves] = []
        self._stop_requested = threading.Event()
        self._last_draw = 0.0
        self.variant.observe(lambda _: self._show_variant_controls(), names="value")
        self.launch_button.on_click(catching(self.status, self.launch, self._keep_error))
        self.stop_button.on_click(catching(self.status, self.stop, self._keep_error))
        self._show_variant_controls()

    # -- display ------------------------------------------------------------------------------

    def _show_variant_controls(self) -> None:
        """Show the chosen variant's controls only; one not edited since it was shown takes its default."""
        variant = self.variant.value
        self.alpha.layout.display = "" if wb.get_variant(variant).uses_alpha else "none"
        options = wb.variant_options(variant)
        for name, control in self.options.items():
            option = options.get(name)
            control.layout.display = "none" if option is None else ""
            if option is None:
                continue
            if isinstance(control, widgets.Dropdown) and tuple(control.options) != option.choices:
                control.options = option.choices  # another variant's choices
            edited = control.value != self._untouched[name]
            if not edited or (option.choices is not None and control.value not in option.choices):
                control.value = self._untouched[name] = option.default

    def _keep_error(self, message: str) -> None:
        """A button's action failed (``catching`` shows it in the status line): keep it in ``last_error`` too."""
        self.last_error = message

    def _say(self, message: str, error: bool = False) -> None:
        show(self.status, message, error)

    # -- state --------------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        """Whether a launch is still training on its background thread."""
        return self._thread is not None and self._thread.is_alive()

    @property
    def runs(self) -> pd.DataFrame:
        """``wb.load_runs(runs_dir)``: every run there, this panel's and others'; empty when there is none."""
        if not self.runs_dir.is_dir():
            return pd.DataFrame()
        return wb.load_runs(self.runs_dir)

    # -- launching ----------------------------------------------------------------------------

    def launch(self) -> bool:
        """Check the settings, build one ``wb.Run`` per rank and train them on a background thread.

        Identical settings resume an unfinished run; a finished one is reported as done. A bad
        choice, or a launch while a run is going, is refused with a message in the status line
        (and in ``last_error``); nothing is written then. Returns whether training started.
        """
        if self.running:
            return self._refuse("a run is going already: press Stop, or wait for it to end, before launching again")
        try:
            runs = self._build_runs()
        except Exception as error:  # a refused setting is a message in the panel, never a traceback
            return self._refuse(str(error) if isinstance(error, ValueError) else f"{type(error).__name__}: {error}")
        self.last_error = None
        self._paths = [run.path for run in runs]
        self._reset_figure()
        self.progress.bar_style = ""
        self.progress.max, self.progress.value = runs[0].settings["steps"], 0
        todo = [run for run in runs if not run.finished]
        if not todo:
            self.progress.value = self.progress.max
            self._say(f"already finished: {', '.join(p.name for p in self._paths)}; nothing to train (change a "
                      "setting or runs_dir for a new run)")
            return False
        self._stop_requested.clear()
        self._last_draw = 0.0
        self.launch_button.disabled, self.stop_button.disabled = True, False
        self._say(f"starting {todo[0].path.name}...")
        self._thread = threading.Thread(target=self._train, args=(runs,), name="workbench-train", daemon=True)
        self._thread.start()
        return True

    def _refuse(self, message: str) -> bool:
        self.last_error = message
        self._say(f"not launched: {message}", error=True)
        return False

    def _settings(self) -> tuple[list[int], dict[str, Any]]:
        """The chosen ranks and the ``wb.Run`` keyword settings shared by all of them."""
        ranks = sorted(self.ranks.value)
        if not ranks:
            raise ValueError("choose at least one rank")
        if not self.targets.value:
            raise ValueError("choose at least one target module")
        variant = self.variant.value
        uses_alpha = wb.get_variant(variant).uses_alpha
        alpha = float(self.alpha.value)
        if not math.isfinite(alpha) or alpha < 0:
            raise ValueError(f"alpha must be a number > 0, or 0 for alpha = rank; not {alpha!r}")
        targets = [name for name in self.targets.options if name in self.targets.value]  # module order
        # defaults are passed as the library's defaults (None, left out), so the record matches a sweep's
        options = {name: self.options[name].value for name, option in wb.variant_options(variant).items()
                   if self.options[name].value != option.default}
        settings = {
            "alpha": alpha if uses_alpha and alpha > 0 else None,
            "targets": None if tuple(targets) == self._default_targets else targets,
            "lr": float(self.lr.value), "steps": self.steps.value, "eval_every": self.eval_every.value,
            "save_every": self.save_every.value, "seed": self.seed.value, **options,
        }
        return ranks, settings

    def _build_runs(self) -> list[wb.Run]:
        """One ``wb.Run`` per chosen rank; on any error, the directories made so far are removed again (``discard``)."""
        ranks, settings = self._settings()
        if self.runs_dir.exists() and not self.runs_dir.is_dir():
            raise ValueError(f"runs_dir {str(self.runs_dir)!r} is a file, not a directory; choose a directory")
        variant = self.variant.value
        paths = [self.runs_dir / wb.trial_name(variant, rank, settings["lr"], settings["seed"],
                                                settings.get("init", "default")) for rank in ranks]
        curves = [_Curves(path) for path in paths]  # read before anything is written
        runs: list[wb.Run] = []
        try:
            for index, (rank, path) in enumerate(zip(ranks, paths, strict=True)):
                callback = _LiveCallback(self, index, f"run {index + 1} of {len(ranks)}", curves[index])
                runs.append(wb.Run(self.task, variant, rank, path, resume=True, progress_bar=False,
                                   callbacks=[callback, *self.callbacks], **settings))
        except BaseException:
            for run in reversed(runs):
                run.discard()
            raise
        self._curves = curves
        return runs

    def _reset_figure(self) -> None:
        """The figure of this launch's runs (``wb.plots.live_runs``), drawn with what is on disk already."""
        with self.figure.batch_update():
            redraw(self.figure, wb.plots.live_runs([curves.name for curves in self._curves]))
            self._draw(range(len(self._curves)))

    def _draw(self, indices: Sequence[int] | range) -> None:
        """Set the x and y of the runs' traces in place (``live_runs``' order: ``SERIES`` for each run in turn)."""
        with self.figure.batch_update():
            for index in indices:
                curves = self._curves[index]
                for offset, series in enumerate(SERIES):
                    trace = self.figure.data[len(SERIES) * index + offset]
                    trace.x, trace.y = curves.xy(series)

    # -- the training thread ------------------------------------------------------------------

    def _train(self, runs: list[wb.Run]) -> None:
        """Fit each run in turn (on the background thread); show how each ended, or the error."""
        outcomes: list[tuple[str, str]] = []  # (status, what the status line says)
        run = runs[0]
        try:
            for run in runs:
                name = run.path.name
                if run.finished:
                    outcomes.append(("finished", f"{name} already finished"))
                elif self._stop_requested.is_set():
                    outcomes.append(("not started", f"{name} not started"))
                    run.discard()
                else:
                    self._current = run
                    outcomes.append(self._outcome(name, run.fit()))
        except Exception as error:
            self.last_error = f"{run.path.name} failed: {type(error).__name__}: {error}"
            self.progress.bar_style = "danger"
            self._say(self.last_error, error=True)
        else:
            statuses = {status for status, _ in outcomes}
            failed = bool(statuses - {"finished", "stopped", "not started"})
            self.progress.bar_style = "danger" if failed else "warning" if "stopped" in statuses else "success"
            resume = "; launch again to resume" if "stopped" in statuses else ""
            self._say("; ".join(text for _, text in outcomes) + resume, error=failed)
        finally:
            self._current = None
            self.launch_button.disabled, self.stop_button.disabled = False, True

    @staticmethod
    def _outcome(name: str, record: dict[str, Any]) -> tuple[str, str]:
        status, steps = record["status"], record.get("steps_done")
        if status == "finished":
            test = record.get("test", {})
            accuracy = f", test acc {test['test_acc']:.3f}" if "test_acc" in test else ""
            return status, f"{name} finished ({steps} steps{accuracy})"
        if status == "stopped":
            return status, f"{name} stopped at step {steps} (checkpoint saved)"
        return status, f"{name} {status}: {record.get('message', '')}"

    def _show(self, trainer: wb.Trainer, index: int, label: str) -> None:
        """Redraw the running series, the progress bar and the status line (on the training thread)."""
        self._last_draw = time.monotonic()
        curves = self._curves[index]
        self._draw([index])
        self.progress.max, self.progress.value = trainer.steps, trainer.step
        shown = f"step {trainer.step} / {trainer.steps}"
        losses = trainer.recent_losses
        if losses:
            shown += f", loss {sum(losses) / len(losses):.4f}"
        for name, value in trainer.last_metrics.items():
            shown += f", {name} {value:.4f}"
        if trainer.status == "running":
            stopping = " (stopping: saving a checkpoint)" if self._stop_requested.is_set() else ""
            self._say(f"training {curves.name} ({label}): {shown}{stopping}")

    # -- stopping and waiting -----------------------------------------------------------------

    def stop(self) -> None:
        """End the running launch safely: the current run saves a checkpoint, later ranks are not started."""
        if not self.running:
            self._say("nothing is running")
            return
        self._stop_requested.set()
        current = self._current
        if current is not None:
            current.stop()
        self._say("stopping: saving a checkpoint...")

    def wait(self, timeout: float | None = None) -> pd.DataFrame:
        """Block until the launch's background thread ends; return ``wb.load_runs`` over its run directories.

        Raises:
            TimeoutError: training still goes on after ``timeout`` seconds.
        """
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
            if thread.is_alive():
                raise TimeoutError(f"the launch is still training after {timeout} s")
        tables = [wb.load_runs(path) for path in self._paths if wb.runs.is_run(path)]
        return pd.concat(tables, ignore_index=True) if tables else pd.DataFrame()
