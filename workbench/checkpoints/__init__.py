"""Checkpoints: complete, atomic, verifiable snapshots of a training run, in safetensors and JSON."""

from .manager import CheckpointManager, WriteCost
from .snapshot import (
    CheckpointError,
    capture_rng,
    changed_tensors,
    load_checkpoint,
    read_progress,
    restore_rng,
    verify,
)

__all__ = ["CheckpointError", "CheckpointManager", "WriteCost", "capture_rng", "changed_tensors", "load_checkpoint",
           "read_progress", "restore_rng", "verify"]
