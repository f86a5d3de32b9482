"""What a run directory holds: its files, the schema of its record, and the model it rebuilds.

A run directory is the one source of truth of a run::

    config.json      RunRecord: the settings, and how the run ended (status, steps done, test metrics)
    metrics.jsonl    every logged value (``workbench.metrics_log``)
    checkpoints/     step-XXXXXXXX/ checkpoints (``wb.CheckpointManager``)

Everything that reads or writes these paths or the record goes through this module.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any, TypedDict

import torch
from torch import nn

from ..adapt import add_adapters
from ..adapters import get_variant
from ..baselines import BASELINES, TAKES_TRAIN, check_baseline_settings, is_baseline, prepare_baseline
from ..checkpoints import stages
from ..checkpoints.files import write_json
from ..compress import factorize
from ..selection import resolve_mode
from ..tasks import TASKS, Task, from_source, get_task
from ..trainer import check_seed

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
CHECKPOINTS_DIR = "checkpoints"
PRUNED = "pruned"  # stopped by a search's pruner at a validation, with a checkpoint there (``wb.resume_run``)
STATUSES = ("running", "finished", "stopped", PRUNED, "diverged", "failed", stages.RANK_REDUCED, stages.SVD)


class RunSettings(TypedDict):
    """How a run was asked for, every default made explicit (``resolve_settings``): its recipe."""

    task: str
    task_source: dict[str, Any] | None  # what rebuilds a task made from files (``Task.source``); None: by name
    variant: str  # an adapter variant (wb.VARIANTS) or a baseline (wb.BASELINES: "full", "head")
    rank: int | None  # None for a baseline
    alpha: float | None  # None for variants without alpha (vera) and for baselines
    targets: list[str] | None  # None: every adaptable layer (a baseline: none, it adapts no layer)
    train: list[str] | None  # modules trained in full next to the adapters (add_adapters(train=...)), or by
    #                          the "head" baseline on its frozen base; None: none ("full" trains everything)
    options: dict[str, Any]  # every option of the variant; {} for a baseline
    lr: float
    optimizer: str
    steps: int
    eval_every: int
    save_every: int | str  # or "auto": Young/Daly's interval from the measured write time and ``mtbf``
    seed: int
    batch_size: int
    keep_last: int | None
    keep_best: int | None
    monitor: str
    mode: str
    # the trainer's (``wb.Trainer``); a record from before them has none, read as these defaults
    schedule: str  # "constant", "linear" or "cosine"
    warmup_steps: int
    max_grad_norm: float | None  # None: no clipping
    accumulate: int  # micro-batches per optimizer step
    precision: str  # "float32" or "bf16"
    eval_batches: int | None  # None: validate on the whole split
    mtbf: float | None  # save_every="auto": the expected time between failures, in seconds
    compression: dict[str, Any] | None  # a compressed base (``wb.compress``): {"ranks": {layer: k}, and how they
    #                                     were chosen}; the base is factorised at these ranks before anything else


class RunRecord(TypedDict, total=False):
    """config.json. ``settings`` and ``status`` are always there; the rest as the run got to them."""

    settings: RunSettings
    status: str  # one of STATUSES
    message: str  # why it stopped, when it did not finish
    trainable: int  # trainable parameters
    parameters: int  # all the model's parameters (a compressed model's are fewer)
    saved_bytes: int | None  # bytes autograd saved for backward on the first training batch (its first micro-batch;
    #                          under a process group, rank 0's share), measured as it trained
    peak_rss: int | None  # the process's peak resident memory (bytes) while fit() trained, the largest over
    #                       resumes (``wb.memory.peak_resident``); None where it cannot be measured
    started: str  # ISO 8601, UTC
    wall_time: float  # seconds of fit(), summed over resumes
    eval_time: float  # the part of wall_time spent validating and testing
    steps_done: int
    processes: int  # data-parallel processes, when more than one trained it
    test: dict[str, Any]  # the test metrics of the checkpoint validation chose, with its name and step
    save_plan: dict[str, Any]  # save_every="auto": the interval chosen and why (``workbench.save_interval.SavePlan``)
    reduced_from: str  # rank-reduced runs: the source checkpoint
    reduction: dict[str, Any]  # rank-reduced runs: the rank or energy asked, and the per-layer table


# what a record from before these settings means
TRAINER_DEFAULTS = {"task_source": None, "train": None, "schedule": "constant", "warmup_steps": 0,
                    "max_grad_norm": None, "accumulate": 1, "precision": "float32", "eval_batches": None,
                    "compression": None, "mtbf": None}
REQUIRED_SETTINGS = ("task", "variant", "rank", "alpha", "targets", "options", "lr", "seed", "steps", "monitor",
                     "mode")


def compression_label(compression: dict[str, Any] | None) -> str:
    """How a compressed run's base was compressed, as ``"energy=0.9"`` (the rank, energy or budget asked);
    "" for a run that is not compressed."""
    if not compression:
        return ""
    asked = [f"{key}={compression[key]:g}" for key in ("rank", "energy", "params") if compression.get(key) is not None]
    return ", ".join(asked) or f"ranks of {len(compression['ranks'])} layers"


def config_path(run: str | os.PathLike[str]) -> Path:
    """The run's record, ``<run>/config.json``."""
    return Path(run) / CONFIG_FILE


def metrics_path(run: str | os.PathLike[str]) -> Path:
    """The run's metrics log, ``<run>/metrics.jsonl``."""
    return Path(run) / METRICS_FILE


def checkpoints_path(run: str | os.PathLike[str]) -> Path:
    """The run's checkpoint directory, ``<run>/checkpoints`` (a ``wb.CheckpointManager``'s)."""
    return Path(run) / CHECKPOINTS_DIR


def is_run(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a run directory (it has a config.json)."""
    return config_path(Path(path)).exists()


def read_record(run: Path) -> RunRecord:
    """A run's config.json, checked to be a record with its settings.

    Raises:
        ValueError: no config.json, or one that is not a run record (cut short, edited, another file).
    """
    path = config_path(run)
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{run} is not a run directory ({CONFIG_FILE} is missing)") from None
    except (OSError, ValueError) as error:
        raise ValueError(f"{path}: not readable as JSON ({error})") from None
    settings = record.get("settings") if isinstance(record, dict) else None
    missing = [key for key in REQUIRED_SETTINGS if not isinstance(settings, dict) or key not in settings]
    if missing:
        raise ValueError(f"{path}: not a run record (its settings lack {', '.join(missing)})")
    record["settings"] = {**TRAINER_DEFAULTS, **settings}  # a record older than a setting trained with its default
    return record


def write_record(run: Path, record: RunRecord) -> None:
    """Write config.json atomically, as strict JSON."""
    write_json(config_path(run), record)


def run_directories(directory: str | os.PathLike[str]) -> list[Path]:
    """``[directory]`` if it is a run, else the runs in it, by name.

    Raises:
        ValueError: ``directory`` is neither a run nor a directory.
    """
    path = Path(directory)
    if is_run(path):
        return [path]
    if not path.is_dir():
        raise ValueError(f"{path}: no such directory")
    return sorted(p for p in path.iterdir() if is_run(p))


def records(directory: str | os.PathLike[str]) -> list[tuple[Path, RunRecord]]:
    """(run directory, record) of the run ``directory`` is, or of every run in it, in name order.

    In a directory of runs, a run whose config.json cannot be read is left out with a warning,
    so one damaged run never hides the others; the run asked for by name raises instead.

    Raises:
        ValueError: no such directory, or ``directory`` is a run whose record is unreadable.
    """
    if is_run(directory):
        return [(Path(directory), read_record(Path(directory)))]
    found = []
    for run in run_directories(directory):
        try:
            found.append((run, read_record(run)))
        except ValueError as error:
            warnings.warn(f"skipping run {run.name}: {error}", stacklevel=3)
    return found


def run_of(checkpoint: Path) -> Path:
    """The run directory a checkpoint belongs to (``<run>/checkpoints/step-...``).

    Raises:
        ValueError: the checkpoint is not inside a run directory.
    """
    run = checkpoint.parent.parent
    if checkpoint.parent.name != CHECKPOINTS_DIR or not is_run(run):
        raise ValueError(f"{checkpoint} is not a checkpoint of a run directory (no {CONFIG_FILE} two levels up)")
    return run


def task_of(settings: RunSettings, task: Task | None = None) -> Task:
    """The task a run trained on: ``task`` if given (it must have the recorded name), else the one it records.

    A task made from files (``wb.tasks.text_classification`` on a model directory and a data file)
    is rebuilt from its recorded source once its files are checked; a built-in task by its name.

    Raises:
        ValueError: the run's task is neither built in nor recorded and none was given, ``task`` has
            another name, or a recorded file moved or changed.
    """
    name = settings["task"]
    if task is not None:
        if task.name != name:
            raise ValueError(f"the run was trained on task {name!r}, not {task.name!r}: pass the task it used")
        return task
    if settings.get("task_source"):
        return from_source(settings["task_source"])
    if name not in TASKS:
        raise ValueError(f"the run was trained on task {name!r}, which is not built in ({', '.join(TASKS)}): pass "
                         "that wb.tasks.Task as task=... to rebuild its model and data")
    return get_task(name)


def resolve_settings(task: Task, settings: dict[str, Any]) -> RunSettings:
    """Settings with every default made explicit, so that two ways of asking for one run compare equal.

    alpha None becomes the rank (for variants scaled by alpha / r), the variant's options get their
    defaults, targets and train None the task's defaults, mode None the monitor's (``wb.selection``),
    and trainer settings a record from before them lacks their defaults (``TRAINER_DEFAULTS``).
    A baseline (``wb.BASELINES``) records rank, alpha and targets None and options {}; its train
    is the task's default for "head", None for "full".

    Raises:
        ValueError: an unknown variant or option, an invalid option value, a bad seed or mode; an
            adapter variant without a rank; a baseline given a rank, alpha, targets, options (or
            train, for "full").
    """
    if is_baseline(settings["variant"]):
        return _resolve_baseline(task, settings)
    if settings["rank"] is None:
        raise ValueError(f"variant {settings['variant']!r} needs a rank, an integer >= 1; only the baselines "
                         f"({', '.join(BASELINES)}) take rank=None")
    variant = get_variant(settings["variant"])
    alpha = settings["alpha"]
    if alpha is None and variant.uses_alpha and isinstance(settings["rank"], int):
        alpha = float(settings["rank"])
    targets, train = settings["targets"], settings.get("train")
    if targets is None and task.default_targets is not None:
        targets = list(task.default_targets)
    if train is None and task.default_train is not None:
        train = list(task.default_train)
    check_seed(settings["seed"])
    return {**TRAINER_DEFAULTS, **settings, "alpha": alpha, "targets": targets, "train": train,
            "options": variant.resolve_options(settings["options"]),
            "mode": resolve_mode(settings["monitor"], settings.get("mode"))}


def _resolve_baseline(task: Task, settings: dict[str, Any]) -> RunSettings:
    name = settings["variant"]
    check_baseline_settings(name, settings["rank"], settings["alpha"], settings["targets"], settings.get("train"),
                            settings["options"])
    train = settings.get("train")
    if TAKES_TRAIN[name] and train is None and task.default_train is not None:
        train = list(task.default_train)
    check_seed(settings["seed"])
    return {**TRAINER_DEFAULTS, **settings, "rank": None, "alpha": None, "targets": None, "train": train,
            "options": {}, "mode": resolve_mode(settings["monitor"], settings.get("mode"))}


def run_arguments(settings: RunSettings) -> dict[str, Any]:
    """The keyword arguments of ``wb.Run`` that make the run ``settings`` record (its task, out and the
    arguments that do not change the run, such as callbacks, aside)."""
    arguments = {key: value for key, value in settings.items()
                 if key not in ("task", "task_source", "batch_size", "options")}
    return arguments | settings["options"]


def build_model(task: Task, settings: RunSettings) -> nn.Module:
    """The run's model before training: the task's base (factorised at the recorded ranks for a compressed
    run: ``wb.compress``), adapted as the settings say (or prepared for a baseline:
    ``workbench.baselines.prepare_baseline``), from the seed."""
    torch.manual_seed(settings["seed"])
    model = task.base_model()
    if settings.get("compression"):
        factorize(model, settings["compression"]["ranks"])
    if is_baseline(settings["variant"]):
        return prepare_baseline(model, settings["variant"], settings.get("train"))
    targets = settings["targets"] if settings["targets"] is not None else task.default_targets
    return add_adapters(model, settings["variant"], settings["rank"], settings["alpha"], targets,
                        train=settings.get("train"), **settings["options"])
