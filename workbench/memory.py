"""Measuring the activation memory autograd keeps for the backward pass."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class SavedTensors:
    """What autograd saved for backward: the number of distinct storages and their bytes."""

    count: int = 0
    bytes: int = 0
    _seen: set[int] = field(default_factory=set, repr=False)


@contextmanager
def saved_activations(model: nn.Module | None = None) -> Iterator[SavedTensors]:
    """Count the tensors autograd saves for backward while the block runs its forward pass.

    Each storage counts once, whole (``untyped_storage().nbytes()``), however many views of it
    are saved. The model's own parameters and buffers are left out: they are memory the model
    holds anyway, not activations.

    Example::

        with wb.saved_activations(model) as saved:
            loss = model(x).sum()
        print(saved.bytes)
    """
    result = SavedTensors()
    if model is not None:
        result._seen.update(t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers()))

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in result._seen:
            result._seen.add(storage.data_ptr())
            result.count += 1
            result.bytes += storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        yield result
