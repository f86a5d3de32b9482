"""Checkpoints: complete, atomic, verifiable snapshots of a training run, in safetensors and JSON."""

from .manager import CheckpointManager
from .snapshot import CheckpointError, changed_tensors, load_checkpoint, verify

__all__ = ["CheckpointError", "CheckpointManager", "changed_tensors", "load_checkpoint", "verify"]
