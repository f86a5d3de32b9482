"""Runs: one directory per training run, and every table and choice derived from those directories.

A run directory is the one source of truth::

    config.json      the run's settings and how it ended (status, steps done, best, test metrics)
    metrics.jsonl    one line per metric per evaluation: {"step", "split", "metric", "value", "time"}
    checkpoints/     step-XXXXXXXX/ checkpoints (see ``wb.CheckpointManager``)

Selection uses validation metrics only; the test split is measured once, on the checkpoint that
validation chose, so the reported test figure is honest.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import torch.distributed as dist
from torch import nn

from . import metrics_log
from .adapt import add_adapters, trainable_parameters
from .adapters import get_variant
from .checkpoints import CheckpointError, CheckpointManager
from .checkpoints.files import write_json
from .memory import saved_activations
from .peft_format import export_peft
from .selection import best_index, resolve_mode
from .svd import match_ranks, reduce_rank
from .targets import target_patterns
from .tasks import Task, get_task
from .trainer import Callback, Trainer, check_seed, evaluate

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
CHECKPOINTS_DIR = "checkpoints"
REDUCED_STAGE = "rank-reduced"  # the stage of a checkpoint written by reduce_checkpoint


def _read_record(run: Path) -> dict[str, Any]:
    """A run's config.json, checked to hold a record with its settings.

    Raises:
        ValueError: no config.json, or one that is not a run record (cut short, edited, another file).
    """
    path = run / CONFIG_FILE
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{run} is not a run directory ({CONFIG_FILE} is missing)") from None
    except (OSError, ValueError) as error:
        raise ValueError(f"{path}: not readable as JSON ({error})") from None
    settings = record.get("settings") if isinstance(record, dict) else None
    missing = [key for key in RECORD_SETTINGS if not isinstance(settings, dict) or key not in settings]
    if missing:
        raise ValueError(f"{path}: not a run record (its settings lack {', '.join(missing)})")
    return record


RECORD_SETTINGS = ("task", "variant", "rank", "alpha", "targets", "options", "lr", "seed", "steps", "monitor", "mode")


def resolve_settings(task: Task, settings: dict[str, Any]) -> dict[str, Any]:
    """Settings with every default made explicit, so that two ways of asking for one run compare equal.

    alpha None becomes the rank (for variants scaled by alpha / r), the variant's options get their
    defaults, targets None the task's default targets, mode None the monitor's (``wb.selection``).

    Raises:
        ValueError: an unknown variant or option, an invalid option value, or a bad seed.
    """
    variant = get_variant(settings["variant"])
    alpha = settings["alpha"]
    if alpha is None and variant.uses_alpha and isinstance(settings["rank"], int):
        alpha = float(settings["rank"])
    targets = settings["targets"]
    if targets is None and task.default_targets is not None:
        targets = list(task.default_targets)
    check_seed(settings["seed"])
    return {**settings, "alpha": alpha, "targets": targets, "options": variant.resolve_options(settings["options"]),
            "mode": resolve_mode(settings["monitor"], settings.get("mode"))}


def _build_model(task: Task, settings: dict[str, Any]) -> nn.Module:
    torch.manual_seed(settings["seed"])
    model = task.base_model()
    targets = settings["targets"] if settings["targets"] is not None else task.default_targets
    return add_adapters(model, settings["variant"], settings["rank"], settings["alpha"], targets, **settings["options"])


class Run:
    """One training run of a variant at a rank on a task, written to its own directory.

    ``Run(...)`` checks every setting and builds the adapted model; ``fit()`` trains it and
    records the outcome; ``stop()`` (from any thread) ends it with a checkpoint. A run
    directory that exists already is resumed with ``resume=True`` (skipped if finished) and
    refused otherwise.

    Args:
        task: a task name (``wb.tasks.TASKS``) or a ``wb.tasks.Task``.
        variant, rank, alpha, targets, **options: as for ``wb.add_adapters``; targets default
            to the task's.
        out: the run directory.
        lr, optimizer: see ``wb.make_optimizer``.
        steps, eval_every, save_every, seed, callbacks, progress_bar: see ``wb.Trainer``.
        keep_last, keep_best, monitor, mode: see ``wb.CheckpointManager``; the mode is inferred from the
            monitor's name when not given (``"max"`` for ``val_acc``).
        process_group, device: data-parallel training (see ``wb.Trainer``): every process of the
            group makes the same ``Run`` and calls ``fit``; only rank 0 writes the directory.
    """

    def __init__(
        self,
        task: str | Task,
        variant: str,
        rank: int,
        out: str | os.PathLike[str],
        *,
        alpha: float | None = None,
        targets: str | Sequence[str] | None = None,
        lr: float = 3e-3,
        optimizer: str = "adamw",
        steps: int = 300,
        eval_every: int = 50,
        save_every: int = 50,
        seed: int = 0,
        keep_last: int | None = None,
        keep_best: int | None = None,
        monitor: str = "val_loss",
        mode: str | None = None,
        resume: bool = False,
        callbacks: Sequence[Callback] = (),
        progress_bar: bool = True,
        process_group: dist.ProcessGroup | None = None,
        device: torch.device | str | None = None,
        **options: Any,
    ) -> None:
        self.task = get_task(task) if isinstance(task, str) else task
        self.path = Path(out)
        if self.path.exists() and not self.path.is_dir():
            raise ValueError(f"{self.path} is a file; a run needs a directory (a new one, or a run's to resume)")
        self.settings = resolve_settings(self.task, {
            "task": self.task.name, "variant": variant, "rank": rank, "alpha": alpha,
            "targets": target_patterns(targets),
            "options": options, "lr": lr, "optimizer": optimizer, "steps": steps, "eval_every": eval_every,
            "save_every": save_every, "seed": seed, "batch_size": self.task.batch_size,
            "keep_last": keep_last, "keep_best": keep_best, "monitor": monitor, "mode": mode,
        })
        self.record: dict[str, Any] = {}
        self.resume = resume
        if (self.path / CONFIG_FILE).exists():
            self.record = _read_record(self.path)
            if not resume:
                raise ValueError(f"{self.path} holds a run already; resume it (resume=True, --resume) or choose "
                                 "another directory")
            there = resolve_settings(self.task, self.record["settings"])
            changed = [f"{k}: {there.get(k)!r} there, {v!r} here"
                       for k, v in self.settings.items() if there.get(k) != v]
            if changed:
                raise ValueError(f"{self.path} holds a different run; it differs in " + "; ".join(changed))
        made = [p for p in (self.path / CHECKPOINTS_DIR, self.path, *self.path.parents) if not p.exists()]
        try:
            self.model = _build_model(self.task, self.settings)
            self.checkpoints = CheckpointManager(self.path / CHECKPOINTS_DIR, keep_last, keep_best,
                                                 self.settings["monitor"], self.settings["mode"],
                                                 run_config=self.settings)
            self.trainer = Trainer(self.model, self.task, lr=lr, optimizer=optimizer, steps=steps,
                                   eval_every=eval_every, save_every=save_every, checkpoints=self.checkpoints,
                                   metrics_log=self.path / METRICS_FILE, seed=seed, callbacks=callbacks,
                                   progress_bar=progress_bar, monitor=monitor, process_group=process_group,
                                   device=device)
        except BaseException:
            _remove_empty(made)  # a rejected run leaves nothing behind
            raise

    @property
    def finished(self) -> bool:
        return self.record.get("status") == "finished"

    def stop(self) -> None:
        """End a running ``fit`` safely: a checkpoint is saved first. Safe from any thread."""
        self.trainer.stop()

    def fit(self) -> dict[str, Any]:
        """Train (or resume, or skip a finished run) and write the outcome; returns the run's record."""
        if self.finished:
            return self.record
        group, writer = self.trainer.process_group, self.trainer.is_writer
        if group is not None:
            dist.barrier(group=group)  # every rank has read the directory before rank 0 changes it
        self.path.mkdir(parents=True, exist_ok=True)
        self.record = {
            "settings": self.settings,
            "status": "running",
            "trainable": trainable_parameters(self.model),
            "saved_bytes": self._saved_bytes() if writer else None,
            "started": self.record.get("started", datetime.now(UTC).isoformat(timespec="seconds")),
            "wall_time": self.record.get("wall_time", 0.0),
        }
        if group is not None:
            self.record["processes"] = self.trainer.world_size
        if writer:
            write_json(self.path / CONFIG_FILE, self.record)
        start = time.perf_counter()
        try:
            status = self.trainer.fit(resume=self.resume)
        except BaseException as error:
            self.record.update(status="failed", message=f"{type(error).__name__}: {error}")
            raise
        else:
            self.record.update(status=status, message=self.trainer.message, steps_done=self.trainer.step)
            if status == "finished" and writer:
                self.record["test"] = self._test_best()
        finally:
            self.record["wall_time"] += time.perf_counter() - start
            self.checkpoints.close()
            if writer:
                write_json(self.path / CONFIG_FILE, self.record)
        return self.record

    def _saved_bytes(self) -> int:
        """Bytes autograd keeps for backward on one training batch (activation memory)."""
        inputs, targets = next(iter(self.task.loaders(self.settings["seed"])["train"]))
        with torch.random.fork_rng(), saved_activations(self.model) as saved:
            self.task.loss(self.model.train()(inputs), targets)
        return saved.bytes

    def _test_best(self) -> dict[str, Any]:
        best = self.checkpoints.best()
        if best is None:
            return {}
        model = _build_model(self.task, self.settings)
        progress = self.checkpoints.load(best, model)
        loader = self.task.loaders(self.settings["seed"])["test"]
        return {"checkpoint": best.name, "step": progress["step"],
                **evaluate(model, loader, self.task.loss, self.task.counts, "test")}


def _remove_empty(directories: Sequence[Path]) -> None:
    """Remove each directory that exists and is empty, deepest first (what a rejected ``Run`` made)."""
    for directory in sorted(directories, key=lambda p: len(p.parts), reverse=True):
        if directory.is_dir() and not any(directory.iterdir()):
            directory.rmdir()


def train(task: str | Task, variant: str, rank: int, out: str | os.PathLike[str], **settings: Any) -> Path:
    """Train one run (see ``Run`` for the settings) and return its directory."""
    Run(task, variant, rank, out, **settings).fit()
    return Path(out)


def _run_directories(directory: str | os.PathLike[str]) -> list[Path]:
    path = Path(directory)
    if (path / CONFIG_FILE).exists():
        return [path]
    if not path.is_dir():
        raise ValueError(f"{path}: no such directory")
    return sorted(p for p in path.iterdir() if (p / CONFIG_FILE).exists())


def _checkpoint_table(run: Path) -> pd.DataFrame:
    directory = run / CHECKPOINTS_DIR
    if not directory.is_dir():
        return pd.DataFrame(columns=["step", "path", "stage", "size", "created"])
    return CheckpointManager(directory).list()


def _records(directory: str | os.PathLike[str]) -> list[tuple[Path, dict[str, Any]]]:
    """(run directory, record) of the run ``directory`` is, or of every run in it, in name order.

    In a directory of runs, a run whose config.json cannot be read is left out with a warning,
    so one damaged run never hides the others; the run asked for by name raises instead.

    Raises:
        ValueError: no such directory, or ``directory`` is a run whose record is unreadable.
    """
    if (Path(directory) / CONFIG_FILE).exists():
        return [(Path(directory), _read_record(Path(directory)))]
    records = []
    for run in _run_directories(directory):
        try:
            records.append((run, _read_record(run)))
        except ValueError as error:
            warnings.warn(f"skipping run {run.name}: {error}", stacklevel=3)
    return records


def load_runs(directory: str | os.PathLike[str]) -> pd.DataFrame:
    """One row per run under ``directory`` (or for the run ``directory`` is).

    Columns: run, task, variant, rank, alpha, lr, seed, trainable, saved_bytes, steps, steps_done,
    monitor, best_value, best_step, best_checkpoint (by validation, among checkpoints that pass
    verification), test_loss and test_acc (measured on that checkpoint), wall_time (seconds),
    status, path. Runs still going show their checkpoints so far; a run whose config.json is
    unreadable is left out with a warning.
    """
    rows = []
    for run, record in _records(directory):
        settings = record["settings"]
        table = _checkpoint_table(run)
        monitor, mode = settings["monitor"], resolve_mode(settings["monitor"], settings.get("mode"))
        index = best_index(table[monitor], mode) if monitor in table else None
        best = None if index is None else table.loc[index]
        test = record.get("test", {})
        rows.append({
            "run": run.name, "task": settings["task"], "variant": settings["variant"], "rank": settings["rank"],
            "alpha": settings["alpha"], "lr": settings["lr"], "seed": settings["seed"],
            "trainable": record.get("trainable"), "saved_bytes": record.get("saved_bytes"),
            "steps": settings["steps"],
            "steps_done": record.get("steps_done", int(table["step"].max()) if len(table) else 0),
            "monitor": monitor, "best_value": None if best is None else float(best[monitor]),
            "best_step": None if best is None else int(best["step"]),
            "best_checkpoint": None if best is None else best["path"],
            "test_loss": test.get("test_loss"), "test_acc": test.get("test_acc"),
            "wall_time": record.get("wall_time"), "status": record.get("status"), "path": str(run),
        })
    return pd.DataFrame(rows)


def load_metrics(run_or_directory: str | os.PathLike[str]) -> pd.DataFrame:
    """Every logged metric in long format: run, step, split, metric, value (see ``workbench.metrics_log``)."""
    frames = []
    for run, _ in _records(run_or_directory):
        entries = metrics_log.read(run / METRICS_FILE)
        if entries:
            frame = pd.DataFrame(entries)
            frame.insert(0, "run", run.name)
            frames.append(frame[["run", "step", "split", "metric", "value"]])
    if not frames:
        return pd.DataFrame(columns=["run", "step", "split", "metric", "value"])
    return pd.concat(frames, ignore_index=True)


def best_checkpoint(run_or_directory: str | os.PathLike[str], metric: str = "val_loss",
                    mode: str | None = None) -> Path:
    """The path of the best checkpoint by a validation ``metric``, over one run or every run in a directory.

    ``mode`` ("min" or "max") defaults to the metric's (``wb.selection.metric_mode``: "max" for
    val_acc). Only checkpoints that pass verification are candidates.

    Raises:
        ValueError: ``metric`` is not a validation metric, a bad mode, or no checkpoint has the metric.
    """
    if not isinstance(metric, str) or not metric.startswith("val_"):
        raise ValueError(f"metric must be a validation metric (val_loss, val_acc), not {metric!r}: "
                         "choosing on training or test data would bias the result")
    mode = resolve_mode(metric, mode)
    tables = [_checkpoint_table(run) for run, _ in _records(run_or_directory)]
    tables = [t for t in tables if metric in t]
    table = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame()
    index = best_index(table[metric], mode) if metric in table else None
    if index is None:
        raise ValueError(f"no checkpoint under {run_or_directory} records {metric}")
    return Path(table.loc[index, "path"])


def _run_of(checkpoint: Path) -> Path:
    run = checkpoint.parent.parent
    if not (run / CONFIG_FILE).exists():
        raise ValueError(f"{checkpoint} is not a checkpoint of a run directory (no {CONFIG_FILE} two levels up)")
    return run


def load_run_model(checkpoint: str | os.PathLike[str], task: Task | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a run's adapted model and load ``checkpoint`` into it; returns (model, progress).

    A checkpoint written after ``wb.reduce_rank`` loads too: the rebuilt layers take its ranks first.
    """
    checkpoint = Path(checkpoint)
    settings = _read_record(_run_of(checkpoint))["settings"]
    task = task or get_task(settings["task"])
    model = match_ranks(_build_model(task, settings), checkpoint)  # a rank-reduced checkpoint's shapes
    return model, CheckpointManager(checkpoint.parent).load(checkpoint, model)


def evaluate_checkpoints(run: str | os.PathLike[str], split: str = "val", task: Task | None = None) -> pd.DataFrame:
    """Evaluate every checkpoint of a run again on ``split``: step, path, stage, <split>_loss, <split>_acc."""
    run = Path(run)
    settings = _read_record(run)["settings"]
    task = task or get_task(settings["task"])
    loader = task.loaders(settings["seed"])[split]
    rows = []
    for _, row in _checkpoint_table(run).iterrows():
        model, _ = load_run_model(row["path"], task)
        rows.append({"step": row["step"], "path": row["path"], "stage": row["stage"],
                     **evaluate(model, loader, task.loss, task.counts, split)})
    return pd.DataFrame(rows)


def export_checkpoint(checkpoint: str | os.PathLike[str], to: str | os.PathLike[str], format: str = "peft",
                      task: Task | None = None) -> Path:
    """Export a run's checkpoint as an adapter another tool loads; only ``format="peft"`` for now."""
    if format != "peft":
        raise ValueError(f"unknown export format {format!r}; valid formats: peft")
    model, _ = load_run_model(checkpoint, task)
    return export_peft(model, to)


def run_settings(run: str | os.PathLike[str]) -> dict[str, Any]:
    """The settings a run was started with (its config.json ``settings``): task, variant, rank, seed, monitor, mode, ...

    Raises:
        ValueError: ``run`` is not a run directory.
    """
    return dict(_read_record(Path(run))["settings"])


def load_checkpoints(run_or_directory: str | os.PathLike[str]) -> pd.DataFrame:
    """Every complete checkpoint of one run, or of every run in a directory: one row each.

    Columns: run, then ``CheckpointManager.list()``'s (step, path, stage, size, created and the
    recorded metrics such as val_loss, val_acc); runs in name order, each oldest first. Runs
    still being written show the checkpoints they have so far; nothing is created on disk.

    Raises:
        ValueError: the path is neither a run nor a directory.
    """
    frames = [_checkpoint_table(run).assign(run=run.name) for run in _run_directories(run_or_directory)]
    frames = [frame for frame in frames if len(frame)]
    if not frames:
        return pd.DataFrame(columns=["run", "step", "path", "stage", "size", "created"])
    table = pd.concat(frames, ignore_index=True)
    return table[["run", *(column for column in table.columns if column != "run")]]


def evaluate_checkpoint(checkpoint: str | os.PathLike[str], split: str = "val", task: Task | None = None
                        ) -> dict[str, float]:
    """Load a run's checkpoint into a fresh model and measure it on ``split`` of the run's data.

    Returns ``{"<split>_loss", "<split>_acc"}``, as ``wb.evaluate``; the same numbers as the
    checkpoint's row of ``evaluate_checkpoints(run, split)``.

    Raises:
        ValueError: ``checkpoint`` is not a checkpoint of a run directory, or an unknown split.
    """
    checkpoint = Path(checkpoint)
    settings = _read_record(_run_of(checkpoint))["settings"]
    task = task or get_task(settings["task"])
    loaders = task.loaders(settings["seed"])
    if split not in loaders:
        raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(loaders)}")
    model, _ = load_run_model(checkpoint, task)
    return evaluate(model, loaders[split], task.loss, task.counts, split)


def delete_checkpoint(checkpoint: str | os.PathLike[str]) -> None:
    """Delete one checkpoint directory of a run (``CheckpointManager.delete``), then release the lock.

    Raises:
        CheckpointError: another process or run is writing checkpoints there (holds the lock),
            or ``checkpoint`` is not a checkpoint of its directory.
    """
    checkpoint = Path(checkpoint)
    if not checkpoint.is_dir():
        raise CheckpointError(f"{checkpoint}: no such checkpoint")
    manager = CheckpointManager(checkpoint.parent)
    try:
        manager.delete(checkpoint)
    finally:
        manager.close()


def reduce_checkpoint(
    checkpoint: str | os.PathLike[str],
    out: str | os.PathLike[str],
    rank: int | None = None,
    energy: float | None = None,
    task: Task | None = None,
) -> tuple[Path, pd.DataFrame]:
    """Reduce a run's checkpoint to a lower rank (``wb.reduce_rank``) and keep it as a run of its own.

    ``out`` becomes a run directory whose ``config.json`` holds the source run's settings (the
    recipe its model is built by: rank, alpha and init as trained, so a PiSSA residual is rebuilt
    the same), ``status`` "rank-reduced", ``reduced_from`` and the per-layer table; its one
    checkpoint, at the source's step with stage "rank-reduced", holds the reduced adapters (no
    optimizer state: the factors are new tensors) and their validation metrics, and the record
    has their test metrics, so the runs table compares it with the run it came from.

    Returns:
        (the new checkpoint's path, ``reduce_rank``'s per-layer table).

    Raises:
        ValueError: ``out`` holds a run already, ``checkpoint`` is not a run's, or a bad
            rank / energy (see ``wb.reduce_rank``); nothing is written then.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} is a file; the reduced checkpoint is kept as a run directory: give a new directory")
    if (out / CONFIG_FILE).exists():
        raise ValueError(f"{out} holds a run already; choose another directory for the reduced checkpoint")
    source = _read_record(_run_of(Path(checkpoint)))
    settings = source["settings"]
    task = task or get_task(settings["task"])
    model, progress = load_run_model(checkpoint, task)
    table = reduce_rank(model, rank=rank, energy=energy)
    loaders = task.loaders(settings["seed"])
    metrics = evaluate(model, loaders["val"], task.loss, task.counts, "val")
    out.mkdir(parents=True, exist_ok=True)
    with CheckpointManager(out / CHECKPOINTS_DIR, monitor=settings["monitor"], mode=settings["mode"],
                           run_config=settings) as manager:
        path = manager.save(progress["step"], model, metrics=metrics, stage=REDUCED_STAGE)
    write_json(out / CONFIG_FILE, {
        "settings": settings, "status": REDUCED_STAGE, "reduced_from": str(Path(checkpoint).resolve()),
        "reduction": {"rank": rank, "energy": energy, "layers": table.to_dict("records")},
        "trainable": trainable_parameters(model), "steps_done": progress["step"], "wall_time": 0.0,
        "test": {"checkpoint": path.name, "step": progress["step"],
                 **evaluate(model, loaders["test"], task.loss, task.counts, "test")},
    })
    return path, table

