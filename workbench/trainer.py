"""The trainer: optimise an adapted model on a task, evaluating and checkpointing as it goes."""

from __future__ import annotations

import json
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .checkpoints import CheckpointManager
from .optim import make_optimizer
from .tasks.base import Task, classification_counts, classification_loss

RECENT_LOSSES = 50
FINAL_STAGE = "finetuned"  # the stage label of the checkpoint a finished fit ends with; never pruned


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

    Args:
        model: a model with adapters (``wb.add_adapters``) or any model with trainable parameters.
        task: a ``wb.tasks.Task``, or a mapping ``{"train": loader, "val": loader, ...}`` of
            ``torchdata`` ``StatefulDataLoader`` s (plain DataLoaders train, but cannot resume
            mid-epoch exactly) whose batches are ``(inputs, targets)``.
        loss, counts: override the task's loss and accuracy counts (needed with plain loaders
            for other than classification).
        lr, optimizer, optimizer_options: see ``wb.make_optimizer``; the variant's rule comes with it.
        steps: optimizer steps in all.
        eval_every, save_every: validate / checkpoint every so many steps (and at the end).
        checkpoints: a ``CheckpointManager`` or a directory for one; None keeps no checkpoints.
        metrics_log: a JSON-lines file that every evaluation and training loss is appended to.
        seed: seeds the data order and the global RNG at the start of ``fit``.
        callbacks: ``Callback`` objects.
        progress_bar: show a ``tqdm.auto`` bar (a widget in a notebook, text in a terminal).
        device: where to train; default the model's device.
        process_group: for data-parallel training, the ``torch.distributed`` group; only its
            rank 0 writes checkpoints and logs. None: one process.
        monitor: the validation metric shown in the progress bar.

    Raises:
        ValueError: a bad number of steps or interval, or loaders without "train" / "val".
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
        if isinstance(task, Task):
            self.loaders = task.loaders(seed)
            self.loss, self.counts = loss or task.loss, counts or task.counts
        else:
            missing = {"train", "val"} - set(task)
            if missing:
                raise ValueError(f"loaders need the splits train and val; missing: {', '.join(sorted(missing))}")
            self.loaders = dict(task)
            self.loss, self.counts = loss or classification_loss, counts or classification_counts
        self.model = model
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.optimizer = make_optimizer(model, lr, optimizer, **dict(optimizer_options or {}))
        self.steps, self.eval_every, self.save_every, self.seed = steps, eval_every, save_every, seed
        self.process_group = process_group
        self.is_writer = process_group is None or dist.get_rank(process_group) == 0
        if isinstance(checkpoints, (str, os.PathLike)):
            checkpoints = CheckpointManager(checkpoints, monitor=monitor)
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
        self._log_lines: list[str] = []

    # -- control ------------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask ``fit`` to save a checkpoint and return; safe from any thread.

        Asked before ``fit`` has started, it takes effect after ``fit``'s first step.
        """
        self._stop.set()

    def resume(self) -> bool:
        """Load the newest valid checkpoint (model, optimizer, RNGs, data position); False if none."""
        if self.checkpoints is None:
            return False
        progress = self.checkpoints.resume(self.model, self.optimizer)
        if progress is None:
            return False
        extra = progress["extra"]
        self.step, self.epoch = progress["step"], extra["epoch"]
        self.loaders["train"].load_state_dict(extra["loader"])
        self.recent_losses.extend(extra["losses"])
        self.last_metrics = dict(progress["metrics"])
        self._truncate_log(self.step)
        return True

    # -- the loop -----------------------------------------------------------------------------

    def fit(self, resume: bool = False) -> str:
        """Train until ``steps``; returns the status: "finished", "stopped" or "diverged".

        With ``resume=True`` training continues from the newest valid checkpoint exactly: the
        same losses, parameters and optimizer state as a run that was never interrupted.
        A non-finite loss ends the run before that step is applied or saved, so no checkpoint
        ever holds a diverged state; ``trainer.message`` says at which step. When ``fit``
        returns, every checkpoint is on disk and the directory's lock is released. A finished
        run's last checkpoint has the stage label "finetuned", so pruning never deletes it.
        """
        torch.manual_seed(self.seed)
        if not (resume and self.resume()):
            self._truncate_log(0)
        self.status = "running"
        bar = tqdm(total=self.steps, initial=self.step, disable=not (self.progress_bar and self.is_writer),
                   desc="train", dynamic_ncols=True)
        self.model.train()  # once: evaluate() puts the mode back as it found it
        try:
            while self.step < self.steps:
                inputs, targets = self._next_batch()
                loss = self.loss(self.model(inputs), targets)
                if not torch.isfinite(loss):
                    self.status = "diverged"
                    self.message = (f"training stopped: the loss became {loss.item()} at step {self.step + 1}; "
                                    "lower the learning rate. Checkpoints hold only states from before it.")
                    break
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
                self.step += 1
                value = loss.item()
                self.recent_losses.append(value)
                self._log(self.step, "train", {"loss": value})
                for callback in self.callbacks:
                    callback.on_step(self, value)
                at_end = self.step == self.steps
                saving = at_end or self.step % self.save_every == 0 or self._stop.is_set()
                if at_end or saving or self.step % self.eval_every == 0:
                    self.last_metrics = self.evaluate("val")
                    self._log(self.step, "val", self.last_metrics)
                    for callback in self.callbacks:
                        callback.on_evaluate(self, self.last_metrics)
                if saving:
                    self._save(FINAL_STAGE if at_end else None)
                bar.update(1)
                bar.set_postfix({"loss": f"{value:.4f}", **self._shown_metric()}, refresh=False)
                if self._stop.is_set():
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
        for callback in self.callbacks:
            callback.on_end(self)
        return self.status

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

    def _save(self, stage: str | None = None) -> None:
        if self.checkpoints is None:
            return
        extra = {"loader": self.loaders["train"].state_dict(), "epoch": self.epoch, "losses": list(self.recent_losses)}
        self._flush_log()
        path = self.checkpoints.save(self.step, self.model, self.optimizer, metrics=self.last_metrics, stage=stage,
                                     extra=extra)
        for callback in self.callbacks:
            callback.on_save(self, path)

    # -- the metrics log ----------------------------------------------------------------------

    def _log(self, step: int, split: str, metrics: Mapping[str, float]) -> None:
        if self.metrics_log is None:
            return
        now = round(time.time(), 3)
        for name, value in metrics.items():
            metric = name.removeprefix(f"{split}_")
            self._log_lines.append(json.dumps({"step": step, "split": split, "metric": metric, "value": value,
                                               "time": now}))

    def _flush_log(self) -> None:
        if self.metrics_log is None or not self._log_lines:
            return
        with open(self.metrics_log, "a") as file:
            file.write("\n".join(self._log_lines) + "\n")
        self._log_lines.clear()

    def _truncate_log(self, step: int) -> None:
        """Drop log lines past ``step``: a resumed run writes them again, identically."""
        if self.metrics_log is None or not self.metrics_log.exists():
            return
        kept = [line for line in self.metrics_log.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        tmp = self.metrics_log.with_suffix(".tmp")
        tmp.write_text("".join(f"{line}\n" for line in kept))
        os.replace(tmp, self.metrics_log)


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
        dist.all_reduce(totals, group=process_group)
    model.train(was_training)
    loss_sum, correct, counted = totals.tolist()
    return {f"{split}_loss": loss_sum / max(counted, 1), f"{split}_acc": correct / max(counted, 1)}
