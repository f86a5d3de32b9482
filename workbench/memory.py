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


STATUS_FILE = "/proc/self/status"
CLEAR_REFS_FILE = "/proc/self/clear_refs"


@dataclass
class PeakResident:
    """The process's peak resident set size (bytes) while a ``peak_resident`` block ran; None where unmeasurable."""

    bytes: int | None = None


def _high_water_mark() -> int | None:
    """Linux's VmHWM of this process in bytes (the peak resident set since the last reset), or None."""
    try:
        with open(STATUS_FILE) as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # reported in kB
    except OSError:
        pass
    return None


@contextmanager
def peak_resident() -> Iterator[PeakResident]:
    """Measure the peak resident memory of this process while the block runs.

    On Linux the kernel's high-water mark (VmHWM) is reset when the block starts (writing 5 to
    ``/proc/self/clear_refs`` sets it to the current resident size) and read when it ends, so the
    figure is this block's peak: the model, optimizer, activations and everything else the process
    holds at that moment. Elsewhere, or where the reset is not allowed, ``bytes`` stays None: a
    process-lifetime maximum would not be this block's.
    """
    result = PeakResident()
    try:
        with open(CLEAR_REFS_FILE, "w") as clear:
            clear.write("5")
    except OSError:
        yield result
        return
    yield result
    result.bytes = _high_water_mark()
