"""The tables derived from run directories: runs, metrics, checkpoints, and the best checkpoint.

They only read; every choice of "best" is ``wb.selection``'s, over checkpoints that verify, and
uses validation metrics only: the test split is measured once, on the checkpoint validation chose.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pandas as pd

from .. import metrics_log, stats
from ..checkpoints import CheckpointManager
from ..selection import best_index, resolve_mode
from .layout import checkpoints_path, compression_label, metrics_path, read_record, records, run_directories


def checkpoint_table(run: Path) -> pd.DataFrame:
    """``CheckpointManager.list()`` of a run's checkpoints (none yet: an empty table); creates nothing."""
    directory = checkpoints_path(run)
    if not directory.is_dir():
        return pd.DataFrame(columns=["step", "path", "stage", "size", "created"])
    return CheckpointManager(directory).list()


def load_runs(directory: str | os.PathLike[str]) -> pd.DataFrame:
    """One row per run under ``directory`` (or for the run ``directory`` is).

    Columns: run, task, variant, rank (None for the baselines "full" and "head"), options (the
    variant's options that differ from their defaults, e.g. "init=pissa"; "" for none; a compressed
    run's with "compressed energy=0.9 (svd)", so each stage is a configuration of its own),
    compression (``"energy=0.9"``; "" for none), compression_stage (svd, rank-reduced, finetuned;
    None), alpha, lr,
    seed, trainable, parameters (the whole model's; a compressed model's are fewer), saved_bytes,
    peak_rss (bytes; the process's peak resident memory while the run trained, where measurable),
    steps, steps_done, monitor, best_value, best_step, best_checkpoint (by validation, among
    checkpoints that pass verification), that checkpoint's validation metrics (val_loss, val_acc,
    ...: one checkpoint per run, chosen by the one rule), test_loss and test_acc (measured on that
    checkpoint), wall_time and eval_time (seconds: all of ``fit``, and the part of it spent
    validating and testing), status, path; then any other held-out metric the runs measured on
    that checkpoint (a language model's test_ppl, forget_loss, forget_ppl, ...). Runs still going
    show their checkpoints so far; a run whose config.json is unreadable is left out with a warning.
    """
    rows = []
    for run, record in records(directory):
        settings = record["settings"]
        table = checkpoint_table(run)
        monitor, mode = settings["monitor"], resolve_mode(settings["monitor"], settings.get("mode"))
        index = best_index(table[monitor], mode) if monitor in table else None
        best = None if index is None else table.loc[index]
        test = record.get("test", {})
        compressed = compression_label(settings.get("compression"))
        stage = (settings.get("compression") or {}).get("stage") if compressed else None
        rows.append({
            "run": run.name, "task": settings["task"], "variant": settings["variant"], "rank": settings["rank"],
            "options": ", ".join(filter(None, [stats.options_label(settings["variant"], settings["options"]),
                                               compressed and f"compressed {compressed} ({stage})"])),
            "compression": compressed, "compression_stage": stage, "alpha": settings["alpha"],
            "lr": settings["lr"], "seed": settings["seed"],
            "trainable": record.get("trainable"), "parameters": record.get("parameters"),
            "saved_bytes": record.get("saved_bytes"),
            "peak_rss": record.get("peak_rss"), "steps": settings["steps"],
            "steps_done": record.get("steps_done", int(table["step"].max()) if len(table) else 0),
            "monitor": monitor, "best_value": None if best is None else float(best[monitor]),
            "best_step": None if best is None else int(best["step"]),
            "best_checkpoint": None if best is None else best["path"],
            **({} if best is None else {metric: float(best[metric]) for metric in table.columns
                                         if metric.startswith("val_") and pd.notna(best[metric])}),
            "test_loss": test.get("test_loss"), "test_acc": test.get("test_acc"),
            "wall_time": record.get("wall_time"), "eval_time": record.get("eval_time"),
            "status": record.get("status"), "path": str(run),
            **{key: value for key, value in test.items()
               if key not in ("checkpoint", "step", "test_loss", "test_acc")},
        })
    return pd.DataFrame(rows)


def summarize(runs: pd.DataFrame | str | os.PathLike[str]) -> pd.DataFrame:
    """One row per configuration of a runs directory (or of its ``load_runs`` table), with 95% intervals over seeds.

    See ``workbench.stats.summarize`` for the columns.
    """
    return stats.summarize(runs if isinstance(runs, pd.DataFrame) else load_runs(runs))


def load_metrics(run_or_directory: str | os.PathLike[str]) -> pd.DataFrame:
    """Every logged metric in long format: run, step, split, metric, value (see ``workbench.metrics_log``),
    and each run's variant and rank (None for a baseline), by which figures colour and dash its lines."""
    frames = []
    columns = ["run", "step", "split", "metric", "value", "variant", "rank"]
    for run, record in records(run_or_directory):
        entries = metrics_log.read(metrics_path(run))
        if entries:
            frame = pd.DataFrame(entries).assign(run=run.name, variant=record["settings"]["variant"],
                                                 rank=record["settings"]["rank"])
            frames.append(frame[columns])
    if not frames:
        return pd.DataFrame(columns=columns)
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
    tables = [checkpoint_table(run) for run, _ in records(run_or_directory)]
    tables = [t for t in tables if metric in t]
    table = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame()
    index = best_index(table[metric], mode) if metric in table else None
    if index is None:
        raise ValueError(f"no checkpoint under {run_or_directory} records {metric}")
    return Path(table.loc[index, "path"])


def run_settings(run: str | os.PathLike[str]) -> dict[str, Any]:
    """The settings a run was started with (its config.json ``settings``): task, variant, rank, seed, monitor, mode, ...

    Raises:
        ValueError: ``run`` is not a run directory.
    """
    return dict(read_record(Path(run))["settings"])


def load_checkpoints(run_or_directory: str | os.PathLike[str]) -> pd.DataFrame:
    """Every complete checkpoint of one run, or of every run in a directory: one row each.

    Columns: run, then ``CheckpointManager.list()``'s (step, path, stage, size, created and the
    recorded metrics such as val_loss, val_acc); runs in name order, each oldest first. Runs
    still being written show the checkpoints they have so far; nothing is created on disk.

    Raises:
        ValueError: the path is neither a run nor a directory.
    """
    frames = [checkpoint_table(run).assign(run=run.name) for run in run_directories(run_or_directory)]
    frames = [frame for frame in frames if len(frame)]
    if not frames:
        return pd.DataFrame(columns=["run", "step", "path", "stage", "size", "created"])
    table = pd.concat(frames, ignore_index=True)
    return table[["run", *(column for column in table.columns if column != "run")]]


def checkpoint_cost(run_or_directory: str | os.PathLike[str]) -> pd.DataFrame:
    """What checkpointing cost each run, from the write times and sizes its trainer logged: one row per run.

    Columns: run, checkpoints (timed writes), write_seconds (their mean), write_seconds_max,
    write_total (seconds), checkpoint_bytes (mean), overhead (write_total / the run's wall_time),
    save_every (as asked: an integer or "auto"), mtbf (seconds, for "auto"), and for "auto" the
    interval it chose, interval_steps, with step_seconds, optimal_seconds (Young's sqrt(2 C MTBF)),
    expected_overhead and expected_lost_work at that interval (``workbench.save_interval``).
    """
    metrics = load_metrics(run_or_directory)
    writes = metrics[metrics["split"] == "checkpoint"]
    rows = []
    for run, record in records(run_or_directory):
        mine = writes[writes["run"] == run.name]
        seconds, sizes = mine.loc[mine["metric"] == "write_time", "value"], mine.loc[mine["metric"] == "bytes", "value"]
        chosen = record.get("save_plan") or {}
        wall = record.get("wall_time")
        rows.append({
            "run": run.name, "checkpoints": len(seconds), "write_seconds": seconds.mean(),
            "write_seconds_max": seconds.max(), "write_total": seconds.sum(), "checkpoint_bytes": sizes.mean(),
            "overhead": seconds.sum() / wall if wall else None,
            "save_every": record["settings"].get("save_every"), "mtbf": record["settings"].get("mtbf"),
            "interval_steps": chosen.get("steps"), "step_seconds": chosen.get("step_seconds"),
            "optimal_seconds": chosen.get("optimal_seconds"), "expected_overhead": chosen.get("overhead"),
            "expected_lost_work": chosen.get("lost_work"),
        })
    return pd.DataFrame(rows)
