"""The adapter workbench: low-rank adaptation of PyTorch models, compared and checkpointed.

The public face: ``import workbench as wb``.
"""

from . import selection, tasks
from ._version import __version__ as __version__
from .adapt import (
    AdapterConfig,
    adapter_config,
    add_adapters,
    merge_adapters,
    remove_adapters,
    trainable_parameters,
    unmerge_adapters,
)
from .adapters import AdapterLayer, adapter_layers, get_variant, variant_names, variant_options
from .baselines import BASELINES
from .checkpoints import CheckpointError, CheckpointManager
from .claims import check_claims
from .cli import command_line
from .compress import LowRankLinear, compress, compressed_ranks
from .memory import SavedTensors, saved_activations
from .optim import OPTIMIZERS, make_optimizer
from .peft_format import export_peft, import_peft
from .report import write_report
from .runs import (
    Run,
    best_checkpoint,
    checkpoint_cost,
    compress_task,
    compression_stages,
    delete_checkpoint,
    effective_rank,
    evaluate_checkpoint,
    evaluate_checkpoints,
    export_checkpoint,
    frozen_metrics,
    load_checkpoints,
    load_metrics,
    load_run_model,
    load_runs,
    reduce_checkpoint,
    resume_run,
    run_settings,
    spectrum,
    spectrum_over_checkpoints,
    summarize,
    sweep,
    train,
    trial_name,
)
from .svd import match_ranks, reduce_rank
from .targets import find_targets
from .tasks import Task
from .trainer import PRECISIONS, SCHEDULES, Callback, Trainer, evaluate, evaluate_task


def __getattr__(name: str) -> object:
    """``wb.ui`` and ``wb.plots`` are imported on first use: the library never loads ipywidgets, nor plotly
    until a figure is drawn. ``wb.VARIANTS`` is the variants registered now (``wb.variant_names()``)."""
    if name == "VARIANTS":
        return variant_names()
    if name in ("ui", "plots"):
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "OPTIMIZERS",
    "PRECISIONS",
    "SCHEDULES",
    "command_line",
    "BASELINES",
    "VARIANTS",
    "AdapterConfig",
    "AdapterLayer",
    "Callback",
    "CheckpointError",
    "CheckpointManager",
    "LowRankLinear",
    "Run",
    "SavedTensors",
    "Task",
    "Trainer",
    "adapter_config",
    "adapter_layers",
    "add_adapters",
    "best_checkpoint",
    "checkpoint_cost",
    "check_claims",
    "compress",
    "compress_task",
    "compressed_ranks",
    "compression_stages",
    "delete_checkpoint",
    "effective_rank",
    "evaluate",
    "evaluate_checkpoint",
    "evaluate_checkpoints",
    "evaluate_task",
    "export_checkpoint",
    "export_peft",
    "find_targets",
    "frozen_metrics",
    "get_variant",
    "import_peft",
    "load_checkpoints",
    "load_metrics",
    "load_run_model",
    "load_runs",
    "make_optimizer",
    "match_ranks",
    "merge_adapters",
    "plots",
    "reduce_checkpoint",
    "resume_run",
    "reduce_rank",
    "remove_adapters",
    "run_settings",
    "saved_activations",
    "selection",
    "spectrum",
    "spectrum_over_checkpoints",
    "summarize",
    "sweep",
    "tasks",
    "train",
    "trainable_parameters",
    "trial_name",
    "unmerge_adapters",
    "variant_names",
    "variant_options",
    "write_report",
]
