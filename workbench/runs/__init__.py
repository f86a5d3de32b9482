"""Runs: one directory per training run, and every table and choice derived from those directories.

- ``layout``: what a run directory holds (config.json's schema, metrics.jsonl, checkpoints/) and
  the model its settings rebuild;
- ``run``: ``Run`` and ``train``, which write one;
- ``tables``: ``load_runs``, ``load_metrics``, ``load_checkpoints``, ``best_checkpoint``, ``summarize``: reading them;
- ``operations``: what is done to a run's checkpoints (load, evaluate, export, delete, reduce, spectra);
- ``sweep``, ``executors`` and ``search``: many runs, in this process or on Ray, and searches that prune
  (Optuna, Ray Tune);
- ``compression``: a task's base compressed by truncated SVD and recovered, three stage runs side by side.
"""

from .compression import compress_task, compression_stages
from .layout import CHECKPOINTS_DIR, CONFIG_FILE, METRICS_FILE, RunRecord, RunSettings, checkpoints_path, is_run
from .operations import (
    EXPORT_FORMATS,
    delete_checkpoint,
    effective_rank,
    evaluate_checkpoint,
    evaluate_checkpoints,
    export_checkpoint,
    frozen_metrics,
    load_run_model,
    reduce_checkpoint,
    spectrum,
    spectrum_over_checkpoints,
)
from .run import Run, resume_run, train
from .sweep import sweep, trial_name
from .tables import best_checkpoint, checkpoint_cost, load_checkpoints, load_metrics, load_runs, run_settings, summarize

__all__ = [
    "CHECKPOINTS_DIR",
    "CONFIG_FILE",
    "EXPORT_FORMATS",
    "METRICS_FILE",
    "Run",
    "RunRecord",
    "RunSettings",
    "best_checkpoint",
    "checkpoint_cost",
    "checkpoints_path",
    "compress_task",
    "compression_stages",
    "delete_checkpoint",
    "effective_rank",
    "evaluate_checkpoint",
    "evaluate_checkpoints",
    "export_checkpoint",
    "frozen_metrics",
    "is_run",
    "load_checkpoints",
    "load_metrics",
    "load_run_model",
    "load_runs",
    "summarize",
    "reduce_checkpoint",
    "resume_run",
    "run_settings",
    "spectrum",
    "spectrum_over_checkpoints",
    "sweep",
    "train",
    "trial_name",
]
