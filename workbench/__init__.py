"""The adapter workbench: low-rank adaptation of PyTorch models, compared and checkpointed.

The public face: ``import workbench as wb``.
"""

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

__version__ = "0.1.0"

__all__ = [
    "VARIANTS",
    "AdapterConfig",
    "AdapterLayer",
    "CheckpointError",
    "CheckpointManager",
    "SavedTensors",
    "adapter_config",
    "adapter_layers",
    "add_adapters",
    "export_peft",
    "import_peft",
    "make_optimizer",
    "merge_adapters",
    "remove_adapters",
    "saved_activations",
    "trainable_parameters",
    "unmerge_adapters",
]
