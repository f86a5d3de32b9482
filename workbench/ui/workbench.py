"""The main panel: choose a variant and its settings, train in the background, watch the curves live.

``wb.ui.Workbench(task="digits", runs_dir="runs")`` shows the controls, Launch and Stop buttons,
a status line, a progress bar and one live figure. A launch trains one run per chosen rank, one
after the other, each in its own directory ``runs_dir / wb.trial_name(variant, rank, lr, seed)``
(the names ``wb.sweep`` gives), so the panel, the CLI and sweeps share and resume each other's runs.

Targets are chosen by group, not by module: a transformer's 30 layers x 7 projections are 7 lines
("attention: q_proj (30 × 576→576)", ...), each a pattern that ``wb.find_targets`` resolves to
exactly its modules (``target_groups``). What the task trains in full (a new head) is shown beside them.

Threads: ``launch()`` checks the settings and builds every ``wb.Run`` on the calling thread, so
a bad choice is refused in the status line before anything is written; training then runs on a
background thread, which only sets widget values (never ``with output:``). The figure and the
progress bar are redrawn at most every ``DRAW_INTERVAL`` seconds, and once more when a run ends.
"""

from __future__ import annotations

import html
import math
import os
import re
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ipywidgets as widgets
import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch
from torch import nn

import workbench as wb

from .panel import Panel, catching, redraw, row, show

RANKS = (1, 2, 4, 8, 16, 32, 64)
DRAW_INTERVAL = 0.4  # seconds between two redraws of the figure and the progress bar during a run
SERIES = wb.plots.LIVE_SERIES  # what the figure shows of each run, in the order of its traces
LOGGED = (*SERIES[:3], "val ppl")  # the series a run's curves keep: "<split> <metric>" of its metrics log
PERPLEXITY_HOVER = "step %{x}<br>val loss %{y:.4f}<br>val ppl %{customdata:.4g}<extra>%{fullData.name}</extra>"
_WIDE = {"description_width": "initial"}
NONE_AT_ZERO = ("max_grad_norm", "eval_batches", "keep_last", "keep_best")  # 0 in the box: the library's None


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


KINDS = ("attention", "MLP", "head", "other")  # the order the targets control lists its groups in
_HEAD = {"classifier", "lm_head", "head", "score"}
_ATTENTION = {"q_proj", "k_proj", "v_proj", "o_proj", "query", "key", "value", "qkv", "c_attn", "out_proj"}
_MLP = {"mlp", "ffn", "feed_forward", "intermediate", "gate_proj", "up_proj", "down_proj", "c_fc", "w1", "w2", "w3"}


@dataclass(frozen=True)
class TargetGroup:
    """Adaptable modules that play one part, e.g. the query of every layer, and the pattern that selects them.

    Attributes:
        kind: one of ``KINDS`` (``target_kind``).
        pattern: what the panel passes in ``targets=``: a name suffix (``"query"``,
            ``"attention.output.dense"``) or, where no suffix tells the modules apart, a regular
            expression (``r"bert\\.encoder\\.layer\\.\\d+\\.output\\.dense"``); ``wb.find_targets`` with
            it selects exactly ``modules``.
        modules: the qualified names, in module order.
        features: (in, out) features of the first module.
        default: whether the task's ``default_targets`` adapt these modules.
    """

    kind: str
    pattern: str
    modules: tuple[str, ...]
    features: tuple[int, int]
    default: bool

    @property
    def label(self) -> str:
        """How the targets control lists it: ``"attention: query (6 × 384→384)"``."""
        shown = _shared_name(self.modules) if "\\" in self.pattern else self.pattern
        count = f"{len(self.modules)} × " if len(self.modules) > 1 else ""
        return f"{self.kind}: {shown} ({count}{self.features[0]}→{self.features[1]})"


def _role(name: str) -> str:
    """A module's name with its block index as ``*``: ``"model.layers.3.mlp.up"`` -> ``"model.layers.*.mlp.up"``.

    An index is a component of digits between two others (a ``ModuleList`` of blocks); a leading
    or last one (``nn.Sequential``'s ``"0"``, ``"2.0"``) is part of the name.
    """
    parts = name.split(".")
    return ".".join("*" if 0 < i < len(parts) - 1 and part.isdigit() else part for i, part in enumerate(parts))


def _shared_name(modules: Sequence[str]) -> str:
    """What the names of a group's modules share: their ``_role``, or the one module's name."""
    return _role(modules[0]) if len(modules) > 1 else modules[0]


def target_kind(name: str) -> str:
    """The part a module plays, from its name: ``"attention"``, ``"MLP"``, ``"head"`` or ``"other"``.

    head: a component ``classifier``, ``lm_head``, ``head`` or ``score``; attention: a component
    containing ``attn`` or ``attention``, or a last one such as ``q_proj`` / ``query`` / ``c_attn``;
    MLP: a component such as ``mlp``, ``intermediate``, ``gate_proj``, ``fc1``, or a block's
    ``output.dense`` (BERT's second MLP layer); anything else (a pooler, an embedding projection) is other.
    """
    parts = name.split(".")
    if _HEAD & set(parts):
        return "head"
    if parts[-1] in _ATTENTION or any("attn" in part.lower() or "attention" in part.lower() for part in parts):
        return "attention"
    if _MLP & set(parts) or re.fullmatch(r"fc\d*", parts[-1]) or ("*" in _role(name) and name.endswith("output.dense")):
        return "MLP"
    return "other"


def _features(module: nn.Module) -> tuple[int, int]:
    """(in, out) features of a layer: ``nn.Linear``'s weight is (out, in), transformers' ``Conv1D``'s (in, out)."""
    rows, columns = module.weight.shape
    return (int(columns), int(rows)) if isinstance(module, nn.Linear) else (int(rows), int(columns))


def _pattern(model: nn.Module, modules: Sequence[str], train: Sequence[str] | None) -> str:
    """The shortest name suffix that selects exactly ``modules`` (``wb.find_targets``), else a regex of their role."""
    wanted = set(modules)
    parts = _shared_name(modules).split(".")
    suffixes = [".".join(parts[-k:]) for k in range(1, len(parts) + 1) if "*" not in parts[-k:]]
    regex = r"\.".join(r"\d+" if part == "*" else re.escape(part) for part in parts)
    for candidate in [*suffixes, regex if "\\" in regex else f"^{regex}$"]:
        try:
            if set(wb.find_targets(model, candidate, train=train)) == wanted:
                return candidate
        except ValueError:  # it also selects a layer that cannot be adapted (tied, trained in full)
            continue
    raise ValueError(f"no pattern selects exactly {', '.join(modules)}")  # a regex of the names always does


def target_groups(task: wb.Task, model: nn.Module | None = None) -> list[TargetGroup]:
    """The adaptable modules of ``task.base_model()`` in groups, one per part they play, in ``KINDS`` order.

    Adaptable: what ``wb.add_adapters`` can wrap next to the task's ``default_train`` modules
    (``nn.Linear``, transformers ``Conv1D``; tied and shared layers, and those trained in full,
    left out), as ``wb.find_targets`` resolves it. The modules of one group share their name but
    for the block index (``_role``); a group the task's default targets select only part of is
    split into its modules, so that the defaults are always a choice of whole groups.

    Args:
        model: the task's base model, if you have one already (building it can take seconds).

    Raises:
        ValueError: the model has no adaptable module, or the default targets match none.
    """
    if model is None:
        with torch.random.fork_rng():
            model = task.base_model()
    train = None if task.default_train is None else list(task.default_train)
    every = wb.find_targets(model, train=train)
    chosen = set(every if task.default_targets is None else wb.find_targets(model, task.default_targets, train=train))
    roles: dict[str, list[str]] = {}
    for name in every:
        roles.setdefault(_role(name), []).append(name)
    parts: list[list[str]] = []
    for names in roles.values():
        whole = len({name in chosen for name in names}) == 1
        parts.extend([names] if whole else [[name] for name in names])
    groups = [TargetGroup(target_kind(names[0]), _pattern(model, names, train), tuple(names),
                          _features(every[names[0]]), names[0] in chosen) for names in parts]
    return sorted(groups, key=lambda group: KINDS.index(group.kind))  # stable: module order within a kind


class _Curves:
    """What the figure shows of one run: steps and values of each series, and the checkpoint steps.

    Filled from the run directory at launch (a resumed or finished run shows its history), then
    appended to by the training thread only.
    """

    def __init__(self, run: Path) -> None:
        self.name = run.name
        self.points: dict[str, tuple[list[int], list[float]]] = {s: ([], []) for s in LOGGED}
        self.saved: list[int] = []
        if wb.runs.is_run(run):
            metrics = wb.load_metrics(run)
            for series in LOGGED:
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

    def perplexity(self) -> np.ndarray:
        """The validation perplexity at each step of the validation loss (NaN where none was logged)."""
        ppl = dict(zip(*self.points["val ppl"], strict=True))
        return np.array([ppl.get(step, math.nan) for step in self.points["val loss"][0]], dtype=np.float64)


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
        if "val_ppl" in metrics:
            self.curves.add("val ppl", trainer.step, metrics["val_ppl"])

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
        variant, ranks, alpha, lr, steps, eval_every, save_every, mtbf, seed, targets: the controls
            (``ranks`` and ``targets`` are multi-selects; ``alpha`` 0 means alpha = rank; an ``mtbf`` such
            as "4h" replaces ``save_every`` by ``save_every="auto"``, and the status line then says which
            interval it chose, with its write overhead and expected lost work). ``variant``
            offers ``wb.VARIANTS``, then the baselines ``wb.BASELINES`` ("full", "head"), for which
            ranks and targets are disabled and ignored: one run, of the base model itself.
            ``targets`` lists the ``target_groups``, attention first, then MLP, head and other, one
            line per part the modules play, e.g. "attention: query (6 × 384→384)"; its values are
            the groups' patterns, passed as ``targets=`` (the task's default targets chosen at first,
            and passed as None, the task's default, while chosen).
            ``ranks`` offers only the ranks every chosen target allows (at most min(in, out) of each
            layer, for a variant whose rank is so limited), and changes with the targets.
        training: the trainer's other settings by ``wb.Run`` keyword (optimizer, schedule,
            warmup_steps, max_grad_norm, accumulate, precision, eval_batches, monitor, mode,
            keep_last, keep_best), in a folded section, each with a tooltip; 0 in a box of
            ``NONE_AT_ZERO`` passes None (no clipping, the whole split, keep all, none kept by rank).
            Bad values (a learning rate <= 0, 0 steps) are refused by the library with its message
            in the status line, never clamped.
        command_button, command: "Copy as CLI command" shows ``command_line()`` in the text box.
        target_groups: the ``TargetGroup`` s the targets control lists, in its order.
        trained: what is trained in full next to the adapters: the task's ``default_train`` (a new
            classification head), which ``wb.Run`` uses when the panel passes no ``train``.
        options: the variant-specific controls by option name, one for every option of every
            registered variant (``wb.variant_options``), each shown while a variant that has it is
            chosen, with the option's help as its tooltip (``option_control``); a control left as
            it was follows the chosen variant's default. ``init`` is a Dropdown ("default", or
            "pissa": adapters start from the top-r SVD of each weight).
        launch_button, stop_button, status, progress, figure, widget: the rest of the panel;
            ``figure`` is a ``go.FigureWidget`` of ``wb.plots.live_runs``: four traces per run, with
            ``meta`` ``"<run> train loss"``, ``"<run> val loss"`` (named ``"<run>"`` in the legend),
            ``"<run> val acc"`` and ``"<run> checkpoints"`` (markers on the validation loss at each
            saved step), in the variant's colour, the validation lines in the rank's dash. For a task
            with ``perplexity``, hovering the validation loss shows the validation perplexity too,
            and the status line shows ``val_ppl``.
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
        self.target_groups = target_groups(self.task)
        self._default_targets = tuple(group.pattern for group in self.target_groups if group.default)

        variants = wb.variant_names()
        self.variant = widgets.Dropdown(options=(*variants, *wb.BASELINES), value=variants[0], description="variant",
                                        tooltip="an adapter variant, or a baseline: " + "; ".join(
                                            f"{name}, {about}" for name, about in wb.BASELINES.items()))
        self.ranks = widgets.SelectMultiple(options=RANKS, value=(8,), rows=len(RANKS), description="rank(s)",
                                            tooltip="one run per chosen rank; only ranks every chosen target allows "
                                            "(at most min(in, out) of each) are offered")
        self.alpha = widgets.FloatText(value=0.0, description="alpha (0 = rank)", style=_WIDE,
                                       tooltip="the update's scale is alpha / rank (LoRA's alpha); 0: alpha = rank")
        self.lr = widgets.FloatText(value=3e-3, step=1e-4, description="learning rate", style=_WIDE,
                                    tooltip="the optimizer's learning rate, a number > 0")
        self.steps = widgets.IntText(value=300, description="steps", tooltip="optimizer steps per run, >= 1")
        self.eval_every = widgets.IntText(value=50, description="evaluate every", style=_WIDE,
                                          tooltip="validate every this many steps, >= 1")
        self.save_every = widgets.IntText(value=50, description="checkpoint every", style=_WIDE,
                                          tooltip="save a checkpoint every this many steps, >= 1")
        self.mtbf = widgets.Text(value="", placeholder="e.g. 4h", description="MTBF", style=_WIDE,
                                 tooltip="the expected time between failures (4h, 30m, or seconds): checkpoints are "
                                 "then spaced by Young/Daly's rule from their measured write time "
                                 "(save_every='auto'); empty: every 'checkpoint every' steps")
        self.seed = widgets.IntText(value=0, description="seed",
                                    tooltip="seeds the data split and order, the adapters' init and dropout")
        self.targets = widgets.SelectMultiple(
            options=[(group.label, group.pattern) for group in self.target_groups], value=self._default_targets,
            rows=max(4, min(len(self.target_groups), 12)), description="targets",
            layout=widgets.Layout(width="auto", min_width="300px"),
            tooltip="each line a pattern (wb.find_targets) and the modules it adapts: how many, in→out features")
        self.training = self._training_controls()
        trained = ", ".join(f"<code>{html.escape(name)}</code>" for name in self.task.default_train or ())
        self.trained = widgets.HTML((f"trained in full: {trained} (the task's default)" if trained else
                                     "trained in full: none (adapters only)")
                                    + f"<br>batch size {self.task.batch_size} (the task's)")
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

        self.command_button = widgets.Button(description="Copy as CLI command", icon="terminal",
                                             layout=widgets.Layout(width="auto"),
                                             tooltip="the workbench sweep command that trains these runs")
        self.command = widgets.Textarea(value="", layout=widgets.Layout(width="100%", display="none"), rows=3,
                                        description="CLI", tooltip="select and copy; it trains the same runs in the "
                                        "same directories")

        def column() -> widgets.Layout:
            return widgets.Layout(min_width="300px", margin="0 12px 0 0")

        settings = widgets.VBox([self.variant, self.alpha, *self.options.values(), self.lr, self.seed],
                                layout=column())
        schedule = widgets.VBox([self.steps, self.eval_every, self.save_every, self.mtbf, self.ranks], layout=column())
        header = widgets.HTML(f"<b>Adapter workbench</b>: task <code>{html.escape(self.task.name)}</code>, "
                              f"runs in <code>{html.escape(str(self.runs_dir))}</code>")
        advanced = widgets.Accordion(children=[row(*self.training.values())])
        advanced.set_title(0, "training: optimizer, schedule, checkpoints kept, monitor, precision")
        advanced.selected_index = None
        self.widget = widgets.VBox([
            header,
            row(settings, schedule, widgets.VBox([self.targets, self.trained])),
            advanced,
            row(self.launch_button, self.stop_button, self.command_button, self.progress),
            self.command, self.status, self.figure,
        ])

        self._thread: threading.Thread | None = None
        self._current: wb.Run | None = None
        self._paths: list[Path] = []
        self._curves: list[_Curves] = []
        self._ranks: list[int | None] = []
        self._stop_requested = threading.Event()
        self._last_draw = 0.0
        self.variant.observe(lambda _: self._show_variant_controls(), names="value")
        self.targets.observe(lambda _: self._offer_ranks(), names="value")
        self.command_button.on_click(catching(self.status, self.show_command, self._keep_error))
        self.launch_button.on_click(catching(self.status, self.launch, self._keep_error))
        self.stop_button.on_click(catching(self.status, self.stop, self._keep_error))
        self._show_variant_controls()

    def _training_controls(self) -> dict[str, widgets.ValueWidget]:
        """The trainer's settings beyond the schedule, by ``wb.Run`` keyword, each with what it does as its tooltip.

        Their first values are ``wb.Run``'s defaults; a box of ``NONE_AT_ZERO`` at 0 passes None.
        """
        box = {"style": _WIDE, "layout": widgets.Layout(width="260px")}
        monitors = ["val_loss", "val_acc", *(["val_ppl"] if self.task.perplexity else [])]
        return {
            "optimizer": widgets.Dropdown(options=list(wb.OPTIMIZERS), value="adamw", description="optimizer",
                                          tooltip="the optimizer of the trained parameters", **box),
            "schedule": widgets.Dropdown(options=list(wb.SCHEDULES), value="constant", description="lr schedule",
                                         tooltip="after the warmup: constant, or linear or cosine decay to 0 at the "
                                         "last step", **box),
            "warmup_steps": widgets.IntText(value=0, description="warmup steps",
                                            tooltip="steps of linear warmup from 0 to the learning rate", **box),
            "max_grad_norm": widgets.FloatText(value=0.0, description="clip grad norm (0 = off)",
                                               tooltip="clip the gradient's total 2-norm to this before each step",
                                               **box),
            "accumulate": widgets.IntText(value=1, description="accumulate",
                                          tooltip=f"micro-batches of {self.task.batch_size} (the task's batch size) "
                                          "per optimizer step", **box),
            "precision": widgets.Dropdown(options=list(wb.PRECISIONS), value="float32", description="precision",
                                          tooltip="float32, or bf16: forward and loss under bf16 autocast, the "
                                          "parameters float32", **box),
            "eval_batches": widgets.IntText(value=0, description="eval batches (0 = all)",
                                            tooltip="validate on the first K batches of the validation split", **box),
            "monitor": widgets.Dropdown(options=monitors, value="val_loss", description="monitor",
                                        tooltip="the validation metric that ranks checkpoints and picks the best",
                                        **box),
            "mode": widgets.Dropdown(options=[("auto", None), ("min", "min"), ("max", "max")], value=None,
                                     description="mode", tooltip="whether lower or higher monitor is better; auto: "
                                     "higher for an accuracy, else lower", **box),
            "keep_last": widgets.IntText(value=0, description="keep last (0 = all)",
                                         tooltip="keep the newest K checkpoints, delete older ones", **box),
            "keep_best": widgets.IntText(value=0, description="keep best (0 = off)",
                                         tooltip="also keep the K best checkpoints by the monitor", **box),
        }

    def _offer_ranks(self) -> None:
        """Offer only the ranks every chosen target allows: at most min(in, out) of each, for a rank-limited variant."""
        variant = self.variant.value
        chosen = [group for group in self.target_groups if group.pattern in self.targets.value]
        limited = variant not in wb.BASELINES and wb.get_variant(variant).rank_limited and chosen
        limit = min(min(group.features) for group in chosen) if limited else max(RANKS)
        offered = tuple(rank for rank in RANKS if rank <= limit) or (min(RANKS),)
        if tuple(self.ranks.options) != offered:
            kept = tuple(rank for rank in self.ranks.value if rank in offered)
            self.ranks.options = offered
            self.ranks.value = kept or (min(8, max(offered)),)
            self.ranks.rows = len(offered)

    # -- display ------------------------------------------------------------------------------

    def _show_variant_controls(self) -> None:
        """Show the chosen variant's controls only; one not edited since it was shown takes its default.

        A baseline (``wb.BASELINES``) has no alpha and no options, and ranks and targets are disabled:
        it is one run, of the base model itself.
        """
        variant = self.variant.value
        baseline = variant in wb.BASELINES
        self.ranks.disabled = self.targets.disabled = baseline
        self.alpha.layout.display = "" if not baseline and wb.get_variant(variant).uses_alpha else "none"
        options = {} if baseline else wb.variant_options(variant)
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
        self._offer_ranks()

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

    def _settings(self) -> tuple[list[int | None], dict[str, Any]]:
        """The chosen ranks and the ``wb.Run`` keyword settings shared by all of them.

        A baseline is one run, rank None, without alpha, targets or options (their controls are ignored).
        """
        variant = self.variant.value
        shared = {"lr": float(self.lr.value), "steps": self.steps.value, "eval_every": self.eval_every.value,
                  "save_every": self.save_every.value, "seed": self.seed.value}
        for name, control in self.training.items():  # wb.Run checks them all, naming what is wrong
            shared[name] = None if name in NONE_AT_ZERO and control.value == 0 else control.value
        if self.mtbf.value.strip():  # the interval from the measured write time and this MTBF
            shared |= {"save_every": "auto", "mtbf": self.mtbf.value.strip()}
        if variant in wb.BASELINES:
            return [None], shared
        ranks: list[int | None] = sorted(self.ranks.value)
        if not ranks:
            raise ValueError("choose at least one rank")
        if not self.targets.value:
            raise ValueError("choose at least one target module")
        uses_alpha = wb.get_variant(variant).uses_alpha
        alpha = float(self.alpha.value)
        if not math.isfinite(alpha) or alpha < 0:
            raise ValueError(f"alpha must be a number > 0, or 0 for alpha = rank; not {alpha!r}")
        targets = [pattern for _, pattern in self.targets.options if pattern in self.targets.value]  # listed order
        # defaults are passed as the library's defaults (None, left out), so the record matches a sweep's
        options = {name: self.options[name].value for name, option in wb.variant_options(variant).items()
                   if self.options[name].value != option.default}
        settings = {
            "alpha": alpha if uses_alpha and alpha > 0 else None,
            "targets": None if tuple(targets) == self._default_targets else targets, **shared, **options,
        }
        return ranks, settings

    def command_line(self) -> str:
        """The ``workbench sweep`` command that trains the chosen runs in the panel's directories (``wb.command_line``).

        Raises:
            ValueError: a setting the panel refuses, or a task the command line cannot name.
        """
        ranks, settings = self._settings()
        return wb.command_line(self.task, self.variant.value, ranks, self.runs_dir, **settings)

    def show_command(self) -> str:
        """Show ``command_line()`` in the box below the buttons, to select and copy; returns it."""
        self.command.value = self.command_line()
        self.command.layout.display = ""
        return self.command.value

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
        self._curves, self._ranks = curves, ranks
        return runs

    def _reset_figure(self) -> None:
        """The figure of this launch's runs (``wb.plots.live_runs``), drawn with what is on disk already."""
        with self.figure.batch_update():
            names = [curves.name for curves in self._curves]
            redraw(self.figure, wb.plots.live_runs(names, [self.variant.value] * len(names), self._ranks,
                                                   self.steps.value))
            if self.task.perplexity:  # each validation point's perplexity, in its hover
                for trace in self.figure.data[SERIES.index("val loss")::len(SERIES)]:
                    trace.hovertemplate = PERPLEXITY_HOVER
            self._draw(range(len(self._curves)))

    def _draw(self, indices: Sequence[int] | range) -> None:
        """Set the x and y of the runs' traces in place (``live_runs``' order: ``SERIES`` for each run in turn)."""
        with self.figure.batch_update():
            for index in indices:
                curves = self._curves[index]
                for offset, series in enumerate(SERIES):
                    trace = self.figure.data[len(SERIES) * index + offset]
                    trace.x, trace.y = curves.xy(series)
                    if series == "val loss" and self.task.perplexity:
                        trace.customdata = curves.perplexity()

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
            perplexity = f", test ppl {test['test_ppl']:.4g}" if "test_ppl" in test else ""
            return status, f"{name} finished ({steps} steps{accuracy}{perplexity}){Workbench._plan(record)}"
        if status == "stopped":
            return status, f"{name} stopped at step {steps} (checkpoint saved)"
        return status, f"{name} {status}: {record.get('message', '')}"

    @staticmethod
    def _plan(record: dict[str, Any]) -> str:
        """What save_every="auto" chose, with its expected costs; "" for a fixed interval."""
        plan = record.get("save_plan")
        if plan is None:
            return ""
        return (f"; checkpoints every {plan['steps']} steps (Young/Daly for a {plan['write_seconds']:.2g} s write "
                f"and an MTBF of {plan['mtbf_seconds'] / 3600:.3g} h: writing {plan['overhead']:.2%} of the time, "
                f"expected lost work {plan['lost_work']:.2%})")

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
        for name, value in trainer.last_metrics.items():  # a perplexity can be large: 4 significant digits
            shown += f", {name} {value:.4g}" if name.endswith("_ppl") else f", {name} {value:.4f}"
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
