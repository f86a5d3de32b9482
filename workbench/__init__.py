"""The adapter workbench: low-rank adaptation of PyTorch models, compared and checkpointed.

The public face: ``import workbench as wb``.
"""

from . import selection, tasks
from .adapt import (
    AdapterConfig,
    adapter_config,
    add_adapters,
    merge_adapters,
    remove_adapters,
    trainable_parameters,
    unmerge_adapters,
)
from .adapters import VARIANTS, AdapterLayer, adapter_layers
from .checkpoints import CheckpointError, CheckpointManager
from .memory import SavedTensors, saved_activations
from .optim import make_optimizer
from .peft_format import export_peft, import_peft
from .report import check_claims, write_report
from .runs import (
    Run,
    best_checkpoint,
    delete_checkpoint,
    evaluate_checkpoint,
    evaluate_checkpoints,
    export_checkpoint,
    load_checkpoints,
    load_metrics,
    load_run_model,
    load_runs,
    reduce_checkpoint,
    run_settings,
    train,
)
from .svd import effective_rank, match_ranks, reduce_rank, spectrum, spectrum_over_checkpoints
from .sweep import sweep, trial_name
from .tasks import Task
from .trainer import Callback, Trainer, evaluate

__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    """``wb.ui`` and ``wb.plots`` are imported on first use: the library never loads ipywidgets, nor plotly
    until a figure is drawn."""
    if name in ("ui", "plots"):
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "VARIANTS",
    "AdapterConfig",
    "AdapterLayer",
    "Callback",
    "CheckpointError",
    "CheckpointManager",
    "Run",
    "SavedTensors",
    "Task",
    "Trainer",
    "adapter_config",
    "adapter_layers",
    "add_adapters",
    "best_checkpoint",
    "check_claims",
    "delete_checkpoint",
    "effective_rank",
    "evaluate",
    "evaluate_checkpoint",
    "evaluate_checkpoints",
    "export_checkpoint",
    "export_peft",
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
    "reduce_rank",
    "remove_adapters",
    "run_settings",
    "saved_activations",
    "selection",
    "spectrum",
    "spectrum_over_checkpoints",
    "sweep",
    "tasks",
    "train",
    "trainable_parameters",
    "trial_name",
    "unmerge_adapters",
    "write_report",
]
