"""The task interface: a pre-trained model to adapt, the data to adapt it on, and how to score it.

A task's data are three map-style datasets ("train", "val", "test") whose items are pairs
``(inputs, targets)``; the model maps a batch of inputs to outputs of shape (..., classes)
and targets have shape (...), so one loss and one accuracy serve images (B,) and token
sequences (B, T) alike. Wrap your own model and data by building a ``Task`` directly::

    task = wb.tasks.Task(
        name="my-task",
        base_model=lambda: load_my_pretrained_model(),      # a fresh copy each call
        datasets=lambda seed: {"train": ..., "val": ..., "test": ...},
        default_targets=["q_proj", "v_proj"],
    )
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset
from torchdata.stateful_dataloader import StatefulDataLoader
from torchdata.stateful_dataloader.sampler import RandomSampler

SPLITS = ("train", "val", "test")
IGNORE_INDEX = -100


def classification_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy: outputs (..., C) logits, targets (...) class indices (-100 ignored)."""
    return F.cross_entropy(outputs.reshape(-1, outputs.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX)


def classification_counts(outputs: torch.Tensor, targets: torch.Tensor) -> tuple[int, int]:
    """(correct, counted): argmax predictions against targets, positions marked -100 left out."""
    counted = targets != IGNORE_INDEX
    correct = (outputs.argmax(-1) == targets) & counted
    return int(correct.sum()), int(counted.sum())


@dataclass
class Task:
    """A model to adapt and the data to adapt it on.

    Attributes:
        name: how runs and tables refer to it.
        base_model: returns the pre-trained base model, a fresh copy on each call.
        datasets: ``seed -> {"train", "val", "test"}`` map-style datasets of (inputs, targets).
        default_targets: the modules adapted when a run names none (``None``: every linear layer).
        batch_size: the training batch size.
        loss: ``(outputs, targets) -> scalar`` mean loss; cross-entropy by default.
        counts: ``(outputs, targets) -> (correct, counted)`` for accuracy.
    """

    name: str
    base_model: Callable[[], nn.Module]
    datasets: Callable[[int], Mapping[str, Dataset]]
    default_targets: Sequence[str] | None = None
    batch_size: int = 64
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = classification_loss
    counts: Callable[[torch.Tensor, torch.Tensor], tuple[int, int]] = classification_counts

    def loaders(self, seed: int, batch_size: int | None = None) -> dict[str, StatefulDataLoader]:
        """Data loaders for the three splits; train shuffles from ``seed`` and can resume mid-epoch."""
        return make_loaders(self.datasets(seed), batch_size or self.batch_size, seed)


def make_loaders(datasets: Mapping[str, Dataset], batch_size: int, seed: int) -> dict[str, StatefulDataLoader]:
    """Loaders whose ``state_dict()`` resumes the training order exactly.

    The shuffle has its own generator, inside the sampler (saved in the loader's state); the
    loader gets a second one for its per-epoch base seed. Sharing one generator makes the
    epochs after a resume differ; giving none makes the loader draw from the global RNG, which
    shifts dropout.
    """
    loaders = {}
    with warnings.catch_warnings():  # torchdata's loader calls a torch API deprecated since; nothing of ours
        warnings.filterwarnings("ignore", message="'set_vital' is deprecated")
        for split, dataset in datasets.items():
            if split == "train":
                sampler = RandomSampler(dataset, generator=torch.Generator().manual_seed(seed))
                loaders[split] = StatefulDataLoader(dataset, batch_size=batch_size, sampler=sampler,
                                                    generator=torch.Generator().manual_seed(seed + 1))
            else:
                loaders[split] = StatefulDataLoader(dataset, batch_size=max(batch_size, 256), shuffle=False)
    return loaders
