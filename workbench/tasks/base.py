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
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, Sampler, Subset
from torchdata.stateful_dataloader import StatefulDataLoader
from torchdata.stateful_dataloader.sampler import RandomSampler

SPLITS = ("train", "val", "test")
IGNORE_INDEX = -100
GROUP_BATCHES = 50  # training batches per group sorted by length (``group_by_length``), as transformers' Trainer


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
        batch_size: the training batch size (under data-parallel training, the global batch:
            each of W processes takes batch_size / W of it).
        loss: ``(outputs, targets) -> scalar`` mean loss; cross-entropy by default.
        counts: ``(outputs, targets) -> (correct, counted)`` for accuracy.
        default_train: modules trained in full next to the adapters when a run names none (a new
            classification head; ``add_adapters(train=...)``); ``None``: none.
        collate: merges a list of items into a batch (``None``: torch's default stacking); text
            tasks pad each batch to its own longest sequence.
        eval_batch_size: the batch of the val and test loaders (``None``: max(batch_size, 256));
            smaller for a language model, whose logits are (batch, T, vocabulary).
        perplexity: whether an evaluation also reports ``<split>_ppl`` = exp(mean token loss).
        source: what rebuilds the task in another process (``wb.tasks.from_source``): a JSON-able
            recipe with the paths and SHA-256 of the model's weights and the data; ``None`` for a
            built-in task (rebuilt by name) or one made from objects in memory.
        tokenizer: a text task's tokenizer (for ``wb.tasks.generate``).
        encode: a text task's texts -> token ids, as it tokenizes its data (for ``wb.tasks.predict``).
        classes: a classification task's class names, in label order.
        length: an item's length (a text's tokens); given, training batches hold items of similar
            length (``group_by_length``), so a padded batch wastes little. ``None``: plain shuffling.
    """

    name: str
    base_model: Callable[[], nn.Module]
    datasets: Callable[[int], Mapping[str, Dataset]]
    default_targets: Sequence[str] | None = None
    batch_size: int = 64
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = classification_loss
    counts: Callable[[torch.Tensor, torch.Tensor], tuple[int, int]] = classification_counts
    default_train: Sequence[str] | None = None
    collate: Callable[[list[Any]], Any] | None = None
    eval_batch_size: int | None = None
    perplexity: bool = False
    source: dict[str, Any] | None = None
    tokenizer: Any = None
    encode: Callable[[Sequence[str]], list[torch.Tensor]] | None = None
    classes: Sequence[str] | None = None
    length: Callable[[Any], int] | None = None

    def loaders(self, seed: int, batch_size: int | None = None, rank: int = 0,
                world_size: int = 1) -> dict[str, StatefulDataLoader]:
        """Data loaders for the three splits; train shuffles from ``seed`` and can resume mid-epoch.

        ``rank`` and ``world_size`` give one process's share of data-parallel training (see
        ``make_loaders``); ``batch_size`` is the global batch, over all processes.
        """
        return make_loaders(self.datasets(seed), batch_size or self.batch_size, seed, rank, world_size,
                            collate=self.collate, eval_batch_size=self.eval_batch_size, length=self.length)


def make_loaders(datasets: Mapping[str, Dataset], batch_size: int, seed: int, rank: int = 0,
                 world_size: int = 1, *, collate: Callable[[list[Any]], Any] | None = None,
                 eval_batch_size: int | None = None, length: Callable[[Any], int] | None = None
                 ) -> dict[str, StatefulDataLoader]:
    """Loaders whose ``state_dict()`` resumes the training order exactly.

    The shuffle has its own generator, inside the sampler (saved in the loader's state); the
    loader gets a second one for its per-epoch base seed. Sharing one generator makes the
    epochs after a resume differ; giving none makes the loader draw from the global RNG, which
    shifts dropout.

    Data-parallel (``world_size`` W > 1, this process being ``rank``): ``batch_size`` B is the
    global batch. The train loader yields this rank's B / W of each global batch of the very
    shuffle one process would use (``ShardedRandomSampler``), so W processes together see
    exactly a one-process run's batches; val and test hold every W-th item from ``rank`` on, so
    the ranks' sums add up to the whole split. Splits other than "train" (val, test, and any a
    task adds, such as a language model's "forget") are read in order, ``eval_batch_size`` items
    at a time (``None``: max(batch_size, 256)). ``collate``: as torch's ``collate_fn``. ``length``:
    an item's length; given, each epoch's shuffle is grouped by length (``group_by_length``)
    before it is batched and shared out.

    Raises:
        ValueError: a rank outside 0..W-1, or a batch size that W does not divide.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in 0..{world_size - 1} for world_size {world_size}, not {rank}")
    if batch_size % world_size:
        raise ValueError(f"the global batch size {batch_size} does not split over {world_size} processes; "
                         f"use a number of processes that divides {batch_size}")
    loaders = {}
    with warnings.catch_warnings():  # torchdata's loader calls a torch API deprecated since; nothing of ours
        warnings.filterwarnings("ignore", message="'set_vital' is deprecated")
        for split, dataset in datasets.items():
            if split == "train":
                generator = torch.Generator().manual_seed(seed)
                lengths = None if length is None else [length(dataset[i]) for i in range(len(dataset))]
                sampler = (RandomSampler(dataset, generator=generator) if world_size == 1 and lengths is None else
                           ShardedRandomSampler(dataset, batch_size, rank, world_size, generator, lengths))
                loaders[split] = StatefulDataLoader(dataset, batch_size=batch_size // world_size, sampler=sampler,
                                                    generator=torch.Generator().manual_seed(seed + 1),
                                                    collate_fn=collate)
            else:
                share = dataset if world_size == 1 else Subset(dataset, range(rank, len(dataset), world_size))
                loaders[split] = StatefulDataLoader(share, batch_size=eval_batch_size or max(batch_size, 256),
                                                    shuffle=False, collate_fn=collate)
    return loaders


def group_by_length(order: Sequence[int], lengths: Sequence[int], batch_size: int, group: int,
                    generator: torch.Generator) -> list[int]:
    """``order`` rearranged so that each batch of ``batch_size`` holds items of similar length.

    ``order`` is cut into groups of ``group`` batches (``group`` x ``batch_size`` items, the last
    group shorter); each group is sorted by length (stable) and cut into batches, and the full
    batches of all groups are put in the order of one ``randperm`` from ``generator``. A last
    partial batch (when ``batch_size`` does not divide ``len(order)``) stays last, so every batch
    but the last is full. With a random ``order`` each batch is a random draw among the items of
    about its length, and batches of every length are spread over the epoch, as transformers'
    ``group_by_length`` does (which puts the longest first instead). A batch pads to its longest
    item, so a text task computes on about the mean length instead of the mean of the maxima.
    """
    size = group * batch_size
    ordered = [i for start in range(0, len(order), size)
               for i in sorted(order[start:start + size], key=lengths.__getitem__)]
    full = len(ordered) // batch_size * batch_size
    batches = [ordered[start:start + batch_size] for start in range(0, full, batch_size)]
    shuffled = [i for b in torch.randperm(len(batches), generator=generator).tolist() for i in batches[b]]
    return shuffled + ordered[full:]


class ShardedRandomSampler(Sampler[int]):
    """One rank's share of a one-process shuffle, each global batch split across the ranks; or grouped by length.

    Every epoch draws the permutation P = randperm(n, generator), exactly as torchdata's
    ``RandomSampler`` does with the same generator, so the epochs follow one another as in a
    one-process run. Given ``lengths``, P is then grouped by length (``group_by_length``, from
    the same generator), on any number of ranks including one. Global batch k is P[kB : (k+1)B];
    rank r takes its positions kB + r, kB + r + W, kB + r + 2W, ..., so a loader batching these
    indices by B / W gives every rank its share of the same global batch. A last, partial global
    batch of p items is shared as ceil((p - r) / W) items on rank r; one smaller than W (a rank
    would get none) is left out on every rank, so all ranks take the same number of steps per
    epoch.

    State (``StatefulDataLoader`` saves it): the generator's state at the epoch's start and how
    many indices this rank has yielded, so a resumed loader continues mid-epoch exactly.

    Args:
        dataset: the map-style training dataset (its length is used).
        batch_size: the global batch B, a multiple of ``world_size``.
        rank, world_size: this process r and the number of processes W.
        generator: the shuffle's generator, seeded by the caller.
        lengths: each item's length, to group batches by; ``None``: the plain shuffle.
    """

    def __init__(self, dataset: Dataset, batch_size: int, rank: int, world_size: int,
                 generator: torch.Generator, lengths: Sequence[int] | None = None) -> None:
        self.size = len(dataset)  # type: ignore[arg-type]
        self.batch_size, self.rank, self.world_size, self.generator = batch_size, rank, world_size, generator
        self.lengths = lengths

    def epoch(self) -> list[int]:
        """One epoch's order of all items, drawn from the generator: P, grouped by length if lengths were given."""
        permutation = torch.randperm(self.size, generator=self.generator).tolist()
        if self.lengths is None:
            return permutation
        return group_by_length(permutation, self.lengths, self.batch_size, GROUP_BATCHES, self.generator)

    def share(self, permutation: list[int]) -> list[int]:
        """This rank's indices of one epoch's ``permutation``, global batch after global batch."""
        indices: list[int] = []
        for start in range(0, len(permutation), self.batch_size):
            batch = permutation[start:start + self.batch_size]
            if len(batch) >= self.world_size:
                indices.extend(batch[self.rank::self.world_size])
        return indices

    def __iter__(self) -> Iterator[int]:
        return _ShardIterator(self)

    def __len__(self) -> int:
        full, rest = divmod(self.size, self.batch_size)
        partial = len(range(self.rank, rest, self.world_size)) if rest >= self.world_size else 0
        return full * (self.batch_size // self.world_size) + partial


class _ShardIterator(Iterator[int]):
    """One epoch of a ``ShardedRandomSampler``; ``state_dict`` / ``load_state_dict`` as torchdata's samplers."""

    def __init__(self, sampler: ShardedRandomSampler) -> None:
        self.sampler = sampler
        self._draw()

    def _draw(self) -> None:
        self.generator_state = self.sampler.generator.get_state()
        self.indices = self.sampler.share(self.sampler.epoch())
        self.yielded = 0

    def __next__(self) -> int:
        if self.yielded == len(self.indices):
            raise StopIteration
        self.yielded += 1
        return self.indices[self.yielded - 1]

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator_state, "yielded": self.yielded}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.sampler.generator.set_state(state["generator"])
        self._draw()
        self.yielded = state["yielded"]
