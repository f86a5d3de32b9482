"""Digits: an MLP pre-trained on scikit-learn's 8x8 handwritten digits, adapted to shifted digits.

The 1,797 images ship with scikit-learn (nothing is downloaded). A fixed third of them (600,
the same for every seed) pre-trains the base MLP on the original images; the other 1,197,
shifted, are the adaptation data, split 60/20/20 into train, val and test by the run's seed.
The shifts, on the 8x8 image x in [0, 1] (pixel / 16):

* ``"mirror"``: left-right, x'[i, j] = x[i, 7 - j]. The base gets about 40% right.
* ``"rotate"``: 90 degrees counter-clockwise, x'[i, j] = x[j, 7 - i]. The base gets about 10%.
* ``"invert"``: x' = 1 - x, i.e. 16 - pixel. The base gets almost none right, and low-rank
  adapters recover little: undoing it takes W -> -W in the first layer, a full-rank change.
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from .base import SPLITS, Task
from .cache import cached_model

VERSION = 2  # 2: pre-trained on one thread, whatever the caller's thread count
PRETRAIN_SIZE = 600
PRETRAIN_STEPS = 600
SPLIT_FRACTIONS = (0.6, 0.2, 0.2)


def mirror(images: torch.Tensor) -> torch.Tensor:
    """(N, 64) -> (N, 64): each 8x8 image flipped left-right, x'[i, j] = x[i, 7 - j]."""
    return images.reshape(-1, 8, 8).flip(-1).reshape(-1, 64)


def rotate(images: torch.Tensor) -> torch.Tensor:
    """(N, 64) -> (N, 64): each 8x8 image turned 90 degrees counter-clockwise, x'[i, j] = x[j, 7 - i]."""
    return images.reshape(-1, 8, 8).rot90(1, dims=(-2, -1)).reshape(-1, 64)


def invert(images: torch.Tensor) -> torch.Tensor:
    """(N, 64) -> (N, 64): x' = 1 - x, dark strokes on a light background."""
    return 1 - images


SHIFTS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"mirror": mirror, "rotate": rotate, "invert": invert}


@functools.cache
def load_images() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 digits: images (N, 64) float32 in [0, 1] (pixel / 16) and labels (N,) int64."""
    from sklearn.datasets import load_digits  # scikit-learn ships the data; imported only when the task needs it

    data = load_digits()
    return torch.tensor(data.data, dtype=torch.float32) / 16, torch.tensor(data.target, dtype=torch.int64)


def pools() -> tuple[torch.Tensor, torch.Tensor]:
    """(pretraining, adaptation) indices into ``load_images()``: a fixed permutation, cut after 600."""
    order = torch.randperm(len(load_images()[1]), generator=torch.Generator().manual_seed(0))
    return order[:PRETRAIN_SIZE], order[PRETRAIN_SIZE:]


def split_indices(seed: int) -> dict[str, torch.Tensor]:
    """Indices into ``load_images()`` by split: the adaptation pool, shuffled by ``seed``, cut 60/20/20."""
    adaptation = pools()[1]
    shuffled = adaptation[torch.randperm(len(adaptation), generator=torch.Generator().manual_seed(seed))]
    sizes = [round(fraction * len(shuffled)) for fraction in SPLIT_FRACTIONS[:-1]]
    return dict(zip(SPLITS, shuffled.split([*sizes, len(shuffled) - sum(sizes)]), strict=True))


def build_mlp() -> nn.Sequential:
    """64 -> 128 -> 128 -> 10 with ReLU; the Linear layers are named ``fc1``, ``fc2`` and ``head``."""
    return nn.Sequential(OrderedDict(
        fc1=nn.Linear(64, 128), act1=nn.ReLU(), fc2=nn.Linear(128, 128), act2=nn.ReLU(), head=nn.Linear(128, 10),
    ))


def pretrain_mlp(model: nn.Module) -> None:
    """600 AdamW steps (lr 3e-3) of cross-entropy on batches of 64 original images from the pretraining pool."""
    images, labels = load_images()
    pool = pools()[0]
    generator = torch.Generator().manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(PRETRAIN_STEPS):
        batch = pool[torch.randint(len(pool), (64,), generator=generator)]
        loss = F.cross_entropy(model(images[batch]), labels[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def base_model() -> nn.Module:
    """The pre-trained MLP, from the cache (pre-trained there on first use, in under a second)."""
    return cached_model("digits-mlp", VERSION, build_mlp, pretrain_mlp)


def digits(shift: str = "mirror") -> Task:
    """Adapt the digits MLP to shifted digits: items are (image (64,) float32, label () int64).

    Args:
        shift: ``"mirror"``, ``"rotate"`` or ``"invert"`` (see the module's docstring).

    Returns:
        The task ``"digits"`` (mirror) or ``"digits-<shift>"``; every Linear layer is a default target.

    Raises:
        ValueError: an unknown shift.
    """
    if shift not in SHIFTS:
        raise ValueError(f"unknown shift {shift!r}; valid shifts: {', '.join(SHIFTS)}")
    transform = SHIFTS[shift]

    def datasets(seed: int) -> dict[str, TensorDataset]:
        images, labels = load_images()
        return {split: TensorDataset(transform(images[index]), labels[index])
                for split, index in split_indices(seed).items()}

    name = "digits" if shift == "mirror" else f"digits-{shift}"
    return Task(name=name, base_model=base_model, datasets=datasets, default_targets=None, batch_size=64)
