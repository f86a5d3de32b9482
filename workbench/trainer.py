"""The trainer: optimise an adapted model on a task, evaluating and checkpointing as it goes."""

from __future__ import annotations

import math
import os
import threading
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from . import metrics_log
from .adapt import adapter_config
from .checkpoints import CheckpointManager
from .checkpoints.snapshot import capture_rng, restore_rng
from .optim import make_optimizer
from .tasks.base import Task, classification_counts, classification_loss

RECENT_LOSSES = 50
MAX_SEED = 2**63 - 1  # torch's generators take seeds that fit 64 bits; seed + rank must too
FINAL_STAGE = "finetuned"  # the stage label of the checkpoint a finished fit ends with; never pruned
SVD_INIT_STAGE = "svd-init"  # the step-0 checkpoint of a run whose adapters start from the SVD of W


class Callback:
    """Hooks the trainer calls as a run goes; override the ones you need (the widgets do).

    Every hook gets the trainer; read ``trainer.step``, ``trainer.recent_losses`` and
    ``trainer.last_metrics`` from it. Hooks run on the training thread: keep them quick.
    """

    def on_step(self, trainer: Trainer, loss: float) -> None:
        """After each optimizer step, with that step's training loss."""

    def on_evaluate(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        """After each validation, with e.g. ``{"val_loss": 0.3, "val_acc": 0.91}``."""

    def on_save(self, trainer: Trainer, path: Path) -> None:
        """After each checkpoint is saved (or handed to the async writer)."""

    def on_end(self, trainer: Trainer) -> None:
        """When ``fit`` returns; ``trainer.status`` says why."""


class Trainer:
    """Train the trainable parameters of ``model`` on a task's data.

    Data-parallel training: give every process of a ``torch.distributed`` group the same
    model (built from the same seed), task and settings, and the group as ``process_group``.

    - Wrapping: the trainer wraps the model in ``DistributedDataParallel`` itself (a model
      already wrapped is used as it is, its group the default). ``trainer.model`` stays the
      plain module, so checkpoints hold the same names ("fc1.lora_A", never "module.fc1.lora_A")
      and load into a one-process model.
    - Batch: with a ``Task``, ``task.batch_size`` B is the global batch; each of the W
      processes trains on B / W of every batch a one-process run would draw, in the same
      seeded order (``wb.tasks.make_loaders``). Gradients are weighted so that their average
      over the ranks is the one-process gradient of the whole batch, and the logged loss is the
      whole batch's: W processes train as one would, up to float rounding.
    - Agreement: one small all-reduce per step also agrees on a non-finite loss and on
      ``stop()``, so all ranks end at the same step. Validation sums over all ranks' shares.
    - Writing: rank 0 alone writes checkpoints and the metrics log and shows the progress
      bar. Callbacks run on every rank (``trainer.is_writer`` is True on rank 0, the only one
      where ``on_save`` fires).
    - Randomness: the global RNG is seeded with ``seed + rank`` (dropout masks differ across
      ranks, as across the rows of one batch). Each checkpoint holds every rank's RNG and
      data-loader state, gathered to rank 0; a resume loads the checkpoint rank 0 picks on
      every rank, each restoring its own states, so the run continues exactly. A checkpoint
      resumes only under the number of processes that wrote it.

    Args:
        model: a model with adapters (``wb.add_adapters``), or any model with trainable parameters
            (all of them are trained: fine-tuning a whole model, or a head on a frozen base).
        task: a ``wb.tasks.Task``, or a mapping ``{"train": loader, "val": loader, ...}`` of
            ``torchdata`` ``StatefulDataLoader`` s (plain DataLoaders train, but cannot resume
            mid-epoch exactly) whose batches are ``(inputs, targets)``; under a process group,
            loaders given this way must already hold this rank's share of the data.
        loss, counts: override the task's loss and accuracy counts (needed with plain loaders
            for other than classification).
        lr, optimizer, optimizer_options: see ``wb.make_optimizer``; the variant's rule comes with it.
        steps: optimizer steps in all.
        eval_every, save_every: validate / checkpoint every so many steps (and at the end).
        checkpoints: a ``CheckpointManager`` or a directory for one; None keeps no checkpoints.
        metrics_log: a JSON-lines file that every evaluation and training loss is appended to.
        seed: seeds the data order and the global RNG at the start of ``fit``; an integer in [0, 2**63 - 1].
        callbacks: ``Callback`` objects.
        progress_bar: show a ``tqdm.auto`` bar (a widget in a notebook, text in a terminal).
        device: where to train; default the model's device (under a process group the model
            is moved there before it is wrapped, e.g. ``cuda:<local rank>``).
        process_group: for data-parallel training (above), the ``torch.distributed`` group;
            the loss must be a mean over the targets ``counts`` counts. None: one process.
        monitor: the validation metric shown in the progress bar and ranking checkpoints; the first
            evaluation raises ``ValueError`` if it does not record it, naming the metrics it does.

    Raises:
        ValueError: a bad number of steps or interval, a bad seed, loaders without "train" / "val",
            or a task batch size the number of processes does not divide.
    """

    def __init__(
        self,
        model: nn.Module,
        task: Task | Mapping[str, DataLoader],
        *,
        loss: Any = None,
        counts: Any = None,
        lr: float = 1e-3,
        optimizer: str = "adamw",
        optimizer_options: Mapping[str, Any] | None = None,
        steps: int = 300,
        eval_every: int = 50,
        save_every: int = 50,
        checkpoints: CheckpointManager | str | os.PathLike[str] | None = None,
        metrics_log: str | os.PathLike[str] | None = None,
        seed: int = 0,
        callbacks: Sequence[Callback] = (),
        progress_bar: bool = True,
        device: torch.device | str | None = None,
        process_group: dist.ProcessGroup | None = None,
        monitor: str = "val_loss",
    ) -> None:
        for name, value in (("steps", steps), ("eval_every", eval_every), ("save_every", save_every)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, not {value!r}")
        check_seed(seed)
        wrapped = model if isinstance(model, DistributedDataParallel) else None
        if wrapped is not None:
            model, process_group = wrapped.module, process_group or wrapped.process_group
        self.process_group = process_group
        self.rank = dist.get_rank(process_group) if process_group is not None else 0
        self.world_size = dist.get_world_size(process_group) if process_group is not None else 1
        if isinstance(task, Task):
            self.loaders = task.loaders(seed, rank=self.rank, world_size=self.world_size)
            self.loss, self.counts = loss or task.loss, counts or task.counts
        else:
            missing = {"train", "val"} - set(task)
            if missing:
                raise ValueError(f"loaders need the splits train and val; missing: {', '.join(sorted(missing))}")
            self.loaders = dict(task)
            self.loss, self.counts = loss or classification_loss, counts or classification_counts
        self.model = model
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self._forward: nn.Module = model  # what training calls: the model, or its DDP wrapper
        if process_group is not None:
            if wrapped is None:
                model.to(self.device)
                ids = [self.device] if self.device.type == "cuda" else None
                wrapped = DistributedDataParallel(model, device_ids=ids, process_group=process_group)
            self._forward = wrapped
        self.optimizer = make_optimizer(model, lr, optimizer, **dict(optimizer_options or {}))
        self.steps, self.eval_every, self.save_every, self.seed = steps, eval_every, save_every, seed
        self.is_writer = self.rank == 0
        if isinstance(checkpoints, (str, os.PathLike)):
            checkpoints = CheckpointManager(checkpoints, monitor=monitor)
        self._manager = checkpoints  # every rank reads checkpoints to resume; only rank 0 writes
        self.checkpoints = checkpoints if self.is_writer else None
        self.metrics_log = Path(metrics_log) if metrics_log is not None and self.is_writer else None
        self.callbacks = list(callbacks)
        self.progress_bar, self.monitor = progress_bar, monitor

        self.step = 0
        self.epoch = 0
        self.recent_losses: deque[float] = deque(maxlen=RECENT_LOSSES)
        self.last_metrics: dict[str, float] = {}
        self.status = "new"
        self.message = ""
        self._stop = threading.Event()
        self._iterator: Any = None
        self._log_entries: list[metrics_log.Entry] = []

    # -- control ------------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask ``fit`` to save a checkpoint and return; safe from any thread.

        Asked before ``fit`` has started, it takes effect after ``fit``'s first step. Under a
        process group, a stop asked on any rank ends every rank at the same step.
        """
        self._stop.set()

    def resume(self) -> bool:
        """Load the newest valid checkpoint (model, optimizer, RNGs, data position); False if none.

        Under a process group every rank must call it: rank 0 picks the checkpoint, every rank
        loads it and restores its own RNG and data position.

        Raises:
            ValueError: the checkpoint was written by another number of processes.
        """
        if self._manager is None:
            return False
        if self.process_group is None:
            progress = self._manager.resume(self.model, self.optimizer)
        else:
            progress = self._resume_all_ranks()
        if progress is None:
            return False
        extra = progress["extra"]
        if extra.get("world_size", 1) != self.world_size:
            raise ValueError(f"{progress['path']} was written by a run on {extra.get('world_size', 1)} process(es), "
                             f"this one has {self.world_size}; resume it on as many (torchrun --nproc-per-node "
                             f"{extra.get('world_size', 1)}) so its data order and random states continue exactly")
        loader = extra["loader"]
        if self.process_group is not None:
            restore_rng(extra["ranks"][self.rank]["rng"])
            loader = extra["ranks"][self.rank]["loader"]
        self.step, self.epoch = progress["step"], extra["epoch"]
        self.loaders["train"].load_state_dict(loader)
        self.recent_losses.extend(extra["losses"])
        self.last_metrics = dict(progress["metrics"])
        self._truncate_log(self.step)
        return True

    def _resume_all_ranks(self) -> dict[str, Any] | None:
        """Rank 0 resumes from the newest valid checkpoint; the other ranks then load that one."""
        assert self._manager is not None
        progress = self._manager.resume(self.model, self.optimizer) if self.is_writer else None
        chosen = [None if progress is None else progress["path"]]
        dist.broadcast_object_list(chosen, group=self.process_group, group_src=0)
        if self.is_writer or chosen[0] is None:
            return progress
        return self._manager.load(chosen[0], self.model, self.optimizer)

    # -- the loop -----------------------------------------------------------------------------

    def fit(self, resume: bool = False) -> str:
        """Train until ``steps``; returns the status: "finished", "stopped" or "diverged".

        With ``resume=True`` training continues from the newest valid checkpoint exactly: the
        same losses, parameters and optimizer state as a run that was never interrupted.
        A non-finite loss ends the run before that step is applied or saved, so no checkpoint
        ever holds a diverged state; ``trainer.message`` says at which step. When ``fit``
        returns, every checkpoint is on disk and the directory's lock is released. A finished
        run's last checkpoint has the stage label "finetuned", and a fresh run with PiSSA
        adapters (``init="pissa"``) first saves its untrained state, validated, at step 0 as
        "svd-init"; pruning never deletes staged checkpoints.
        Under a process group every rank calls ``fit``; it returns on all of them together.
        """
        torch.manual_seed(self.seed + self.rank)
        if not (resume and self.resume()):
            self._truncate_log(0)
            if _svd_initialised(self.model):
                self._checkpoint_initial_state()
        self.status = "running"
        bar = tqdm(total=self.steps, initial=self.step, disable=not (self.progress_bar and self.is_writer),
                   desc="train", dynamic_ncols=True)
        self.model.train()  # once: evaluate() puts the mode back as it found it
        try:
            while self.step < self.steps:
                inputs, targets = self._next_batch()
                outputs = self._forward(inputs)
                loss = self.loss(outputs, targets)
                if self.process_group is None:
                    value = None
                    finite = bool(torch.isfinite(loss))
                else:
                    value, weight, finite, asked = self._agree(loss, outputs, targets)
                    loss = loss * weight
                if not finite:
                    self.status = "diverged"
                    self.message = (f"training stopped: the loss became {loss.item() if value is None else value} "
                                    f"at step {self.step + 1}; lower the learning rate. Checkpoints hold only "
                                    "states from before it.")
                    break
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
                self.step += 1
                value = loss.item() if value is None else value
                self.recent_losses.append(value)
                self._log(self.step, "train", {"loss": value})
                for callback in self.callbacks:
                    callback.on_step(self, value)
                at_end = self.step == self.steps
                stopping = self._stop.is_set() if self.process_group is None else asked
                saving = at_end or self.step % self.save_every == 0 or stopping
                if at_end or saving or self.step % self.eval_every == 0:
                    self._validate(self.step)
                if saving:
                    self._save(FINAL_STAGE if at_end else None)
                bar.update(1)
                bar.set_postfix({"loss": f"{value:.4f}", **self._shown_metric()}, refresh=False)
                if stopping:
                    self.status = "stopped"
                    break
            else:
                self.status = "finished"
        finally:
            self._stop.clear()  # a stop asked for before or during this fit ends it; the next fit starts afresh
            bar.close()
            self._flush_log()
            if self.checkpoints is not None:
                self.checkpoints.close()  # waits for a pending save; another process may write here now
        if self.process_group is not None:
            dist.barrier(group=self.process_group)  # rank 0's last checkpoint is on disk for every rank
        for callback in self.callbacks:
            callback.on_end(self)
        return self.status

    def _agree(self, loss: torch.Tensor, outputs: torch.Tensor, targets: torch.Tensor
               ) -> tuple[float, float, bool, bool]:
        """One all-reduce per step: (whole-batch loss, this rank's loss weight, all finite, stop asked on any rank).

        With n_r targets counted on rank r, N = sum_r n_r and L_r rank r's mean loss, the whole
        batch's loss is L = sum_r n_r L_r / N. DDP averages gradients over the W ranks, so rank r
        back-propagates w_r L_r with w_r = W n_r / N: the average is then exactly dL/dtheta, what
        one process computes on the whole batch (w_r = 1 when the shares count alike).
        """
        local = loss.item()
        _, counted = self.counts(outputs.detach(), targets)
        finite = math.isfinite(local)
        sums = torch.tensor([local * counted if finite else 0.0, counted, 0.0 if finite else 1.0,
                             float(self._stop.is_set())], dtype=torch.float64,
                            device=collective_device(self.process_group, self.device))
        dist.all_reduce(sums, group=self.process_group)
        total, count, diverged, asked = sums.tolist()
        if diverged:
            return (local if not finite else math.nan), 1.0, False, bool(asked)
        return total / max(count, 1), self.world_size * counted / max(count, 1), True, bool(asked)

    def _shown_metric(self) -> dict[str, str]:
        value = self.last_metrics.get(self.monitor)
        return {} if value is None else {self.monitor: f"{value:.4f}"}

    def _next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._iterator is None:
            self._iterator = iter(self.loaders["train"])
        try:
            inputs, targets = next(self._iterator)
        except StopIteration:
            self.epoch += 1
            self._iterator = iter(self.loaders["train"])
            inputs, targets = next(self._iterator)
        return inputs.to(self.device), targets.to(self.device)

    def evaluate(self, split: str = "val") -> dict[str, float]:
        """Mean loss and accuracy over a whole split: ``{"<split>_loss": ..., "<split>_acc": ...}``."""
        if split not in self.loaders:
            raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(self.loaders)}")
        return evaluate(self.model, self.loaders[split], self.loss, self.counts, split, self.device, self.process_group)

    def _validate(self, step: int) -> None:
        """Evaluate on "val", log it and tell the callbacks; the monitor must be among the metrics."""
        metrics = self.evaluate("val")
        if self.monitor not in metrics:
            raise ValueError(f"monitor {self.monitor!r} is not recorded: an evaluation records "
                             f"{', '.join(metrics)}; monitor one of them")
        self.last_metrics = metrics
        self._log(step, "val", metrics)
        for callback in self.callbacks:
            callback.on_evaluate(self, metrics)

    def _checkpoint_initial_state(self) -> None:
        """Validate the SVD-initialised model before any step and keep it as the "svd-init" checkpoint."""
        self._validate(0)
        self._save(SVD_INIT_STAGE)

    def _save(self, stage: str | None = None) -> None:
        if self._manager is None:
            return
        ranks = self._gather_states() if self.process_group is not None else None
        if self.checkpoints is None:
            return
        extra = {"loader": self.loaders["train"].state_dict(), "epoch": self.epoch, "losses": list(self.recent_losses)}
        if ranks is not None:
            extra |= {"world_size": self.world_size, "ranks": ranks}
        self._flush_log()
        path = self.checkpoints.save(self.step, self.model, self.optimizer, metrics=self.last_metrics, stage=stage,
                                     extra=extra)
        for callback in self.callbacks:
            callback.on_save(self, path)

    def _gather_states(self) -> list[dict[str, Any]] | None:
        """Every rank's global RNG and data-loader states, in rank order, on rank 0 (None elsewhere)."""
        state = {"rng": capture_rng(), "loader": self.loaders["train"].state_dict()}
        gathered: list[Any] | None = [None] * self.world_size if self.is_writer else None
        dist.gather_object(state, gathered, group=self.process_group, group_dst=0)
        return gathered

    # -- the metrics log ----------------------------------------------------------------------

    def _log(self, step: int, split: str, metrics: Mapping[str, float]) -> None:
        if self.metrics_log is not None:
            self._log_entries += metrics_log.entries(step, split, metrics)

    def _flush_log(self) -> None:
        """Append the buffered entries (before every checkpoint, so the log covers what it holds)."""
        if self.metrics_log is not None:
            metrics_log.append(self.metrics_log, self._log_entries)
            self._log_entries.clear()

    def _truncate_log(self, step: int) -> None:
        """Drop log entries past ``step``: a resumed run writes them again, identically."""
        if self.metrics_log is not None:
            metrics_log.truncate(self.metrics_log, step)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    counts: Callable[[torch.Tensor, torch.Tensor], tuple[int, int]],
    split: str = "val",
    device: torch.device | str | None = None,
    process_group: dist.ProcessGroup | None = None,
) -> dict[str, float]:
    """``{"<split>_loss": L, "<split>_acc": A}`` over every batch of ``loader``, the model in eval mode.

    L = sum_b loss_b * n_b / sum_b n_b, with n_b the targets counted in batch b, and A = correct / counted.
    Under a process group the three sums are reduced over all ranks first.

    Evaluating leaves torch's RNG as it found it (a data loader draws its seed from it), so
    validating more or less often never changes how a run trains.
    """
    was_training = model.training
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64)  # loss sum, correct, counted
    cuda = [device] if device is not None and torch.device(device).type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        for inputs, targets in loader:
            if device is not None:
                inputs, targets = inputs.to(device), targets.to(device)
            outputs = model(inputs)
            correct, counted = counts(outputs, targets)
            totals += torch.tensor([loss(outputs, targets).item() * counted, correct, counted], dtype=torch.float64)
    if process_group is not None:
        reduced = totals.to(collective_device(process_group, device))
        dist.all_reduce(reduced, group=process_group)
        totals = reduced.cpu()
    model.train(was_training)
    loss_sum, correct, counted = totals.tolist()
    return {f"{split}_loss": loss_sum / max(counted, 1), f"{split}_acc": correct / max(counted, 1)}


def check_seed(seed: object) -> int:
    """``seed`` if it is an integer in [0, 2**63 - 1], which torch's generators take whatever is added to it.

    Raises:
        ValueError: another value, naming the valid range.
    """
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seed must be an integer from 0 to 2**63 - 1, not {seed!r}")
    return seed


def collective_device(process_group: dist.ProcessGroup, device: torch.device | str | None) -> torch.device:
    """Where the group's collectives take their tensors: the training device under NCCL, else the CPU (gloo)."""
    if device is not None and dist.get_backend(process_group) == dist.Backend.NCCL:
        return torch.device(device)
    return torch.device("cpu")


def _svd_initialised(model: nn.Module) -> bool:
    """Whether ``model``'s adapters were initialised from the SVD of the weights (``init="pissa"``)."""
    try:
        return adapter_config(model).options.get("init") == "pissa"
    except ValueError:  # a model trained without adapters
        return False

