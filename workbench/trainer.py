"""The trainer: optimise an adapted model on a task, evaluating and checkpointing as it goes."""

from __future__ import annotations

import contextlib
import itertools
import math
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
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from . import metrics_log
from .adapt import adapter_config
from .checkpoints import CheckpointManager, capture_rng, restore_rng, stages
from .checks import is_finite_number, is_integer
from .distributed import Replicas, sum_over_ranks, unwrap
from .memory import saved_activations
from .optim import make_optimizer
from .save_interval import AUTO, SavePlan, check_save_every, plan
from .tasks import Task, classification_counts, classification_loss

MAX_LOG_PERPLEXITY = 700.0  # exp(700) ~ 1e304: a diverged model's perplexity stays a finite float
RECENT_LOSSES = 50
MAX_SEED = 2**63 - 1  # torch's generators take seeds that fit 64 bits; seed + rank must too
SCHEDULES = ("constant", "linear", "cosine")  # the learning-rate schedules (``lr_factor``)
PRECISIONS = ("float32", "bf16")  # what forward and loss compute in (``autocast``)


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
    The collectives below are ``workbench.distributed.Replicas``'s; the trainer calls them from its loop.

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
        eval_every, save_every: validate / checkpoint every so many steps (and at the end). Each
            checkpoint's write time and size are logged (the "checkpoint" metrics "write_time", in
            seconds, and "bytes", at its step) once it is on disk.
            ``save_every="auto"`` with ``mtbf``, the expected time between failures (seconds or
            ``"4h"``), chooses the interval by Young/Daly's rule (``workbench.save_interval``): the first
            checkpoint at the first validation measures the write cost C; after each checkpoint the
            interval becomes sqrt(2 C MTBF) in measured step times, a multiple of ``eval_every``
            (``trainer.save_plan`` says what it chose and why). One process only: under a process group
            the ranks would have to agree on the measurement.
        checkpoints: a ``CheckpointManager`` or a directory for one; None keeps no checkpoints.
        metrics_log: a JSON-lines file that every evaluation and training loss is appended to.
        seed: seeds the data order and the global RNG at the start of ``fit``; an integer in [0, 2**63 - 1].
        callbacks: ``Callback`` objects.
        progress_bar: show a ``tqdm.auto`` bar (a widget in a notebook, text in a terminal).
        progress_label: what the bar is called (a run names itself; a sweep says "trial 2/6 <run>").
        device: where to train (``"cpu"``, ``"cuda"``, ``"cuda:1"``): the model is moved there
            first, and every batch; default the model's device (under a process group the model
            is moved there before it is wrapped, e.g. ``cuda:<local rank>``).
        process_group: for data-parallel training (above), the ``torch.distributed`` group;
            the loss must be a mean over the targets ``counts`` counts. None: one process.
        monitor: the validation metric shown in the progress bar and ranking checkpoints; the first
            evaluation raises ``ValueError`` if it does not record it, naming the metrics it does.
        schedule, warmup_steps: the learning-rate schedule. The optimizer step that follows s steps
            done (s = 0 ... steps - 1) uses lr_g * f(s) in each parameter group g, lr_g the group's own
            base lr (LoRA+'s B group keeps its ratio to A's). With W = ``warmup_steps``, T = ``steps``
            (``lr_factor``, the formulas of transformers' ``get_scheduler``)::

                f(s) = s / W                              while s < W  (linear warmup from 0)
                f(s) = 1                                  "constant" (the default; W = 0: a constant lr)
                f(s) = (T - s) / (T - W)                  "linear"
                f(s) = (1 + cos(pi (s - W) / (T - W))) / 2  "cosine"

            so with W > 0 the first step's lr is 0, step W + 1's the base lr, and linear and cosine
            reach 0 at s = T. Linear and cosine need W < T (they would never decay); "constant" takes
            any W >= 0 (with W >= T the run ends still warming up). ``trainer.scheduler`` is the
            ``torch.optim.lr_scheduler.LambdaLR`` of f; its state is in every checkpoint. Whenever
            the lr varies (not "constant" with W = 0), every step logs the lr its first group used
            as the "train" metric "lr". Example: ``schedule="cosine", warmup_steps=30``.
        max_grad_norm: clip the gradient of the trainable parameters to this total 2-norm before each
            step (``torch.nn.utils.clip_grad_norm_``); every step then logs the norm before clipping as
            the "train" metric "grad_norm", and a non-finite norm ends the run as diverged before the
            step is applied. None (the default): no clipping. Example: ``max_grad_norm=1.0``.
        accumulate: K, the micro-batches (each a batch of the loader) per optimizer step. Micro-batch m's
            mean loss L_m is back-propagated divided by K, so the step's gradient is
            (1/K) sum_m dL_m/dtheta: the gradient of the mean loss over all K micro-batches' targets
            when each counts the same number of them (batch size B: an effective batch of K B). Otherwise
            every micro-batch weighs alike, a target of micro-batch m by 1 / (K n_m) with n_m its
            targets (the short last batch of an epoch, a loss that ignores some targets). The logged
            loss is (1/K) sum_m L_m. ``steps``, ``eval_every`` and ``save_every`` count optimizer steps;
            checkpoints are taken between steps only, so their data position is exact. Under a process
            group, gradients are all-reduced once per step (``no_sync`` before the last micro-batch).
        precision: "float32" (the default), or "bf16": forward and loss, in training and in evaluation,
            run under ``torch.autocast(<device type>, dtype=torch.bfloat16)`` (``autocast``); the
            parameters, their gradients and the optimizer state stay float32.
        eval_batches: validate on the first N batches of the "val" loader only, the same ones every
            time (it is not shuffled); under a process group, the first N of each rank's share. None
            (the default): the whole split. ``trainer.evaluate()`` always evaluates whole splits.

    Raises:
        ValueError: a bad number of steps or interval, a bad seed, loaders without "train" / "val",
            a task batch size the number of processes does not divide; an unknown schedule or
            precision, warmup_steps < 0 (or >= steps for linear and cosine), max_grad_norm not a
            finite number > 0, accumulate or eval_batches not an integer >= 1; each naming the valid values.
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
        save_every: int | str = 50,
        checkpoints: CheckpointManager | str | os.PathLike[str] | None = None,
        metrics_log: str | os.PathLike[str] | None = None,
        seed: int = 0,
        callbacks: Sequence[Callback] = (),
        progress_bar: bool = True,
        device: torch.device | str | None = None,
        process_group: dist.ProcessGroup | None = None,
        monitor: str = "val_loss",
        schedule: str = "constant",
        warmup_steps: int = 0,
        max_grad_norm: float | None = None,
        accumulate: int = 1,
        precision: str = "float32",
        eval_batches: int | None = None,
        mtbf: float | str | None = None,
        progress_label: str = "train",
    ) -> None:
        self.progress_label = progress_label
        self.mtbf = check_save_every(save_every, mtbf)  # seconds, for save_every="auto"; else None
        if self.mtbf is not None and process_group is not None:
            raise ValueError("save_every='auto' measures the write cost on rank 0 alone, so the ranks would save at "
                             "different steps: give save_every an integer under a process group")
        for name, value in (("steps", steps), ("eval_every", eval_every), ("accumulate", accumulate)):
            if not is_integer(value) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, not {value!r}")
        check_seed(seed)
        check_schedule(schedule, warmup_steps, steps)
        clip = max_grad_norm
        if clip is not None and (not is_finite_number(clip) or clip <= 0):
            raise ValueError(f"max_grad_norm must be a finite number > 0, or None for no clipping, not {clip!r}")
        check_precision(precision)
        if eval_batches is not None and (not is_integer(eval_batches) or eval_batches < 1):
            raise ValueError(f"eval_batches must be an integer >= 1, or None for the whole split, not {eval_batches!r}")
        model, process_group, wrapper = unwrap(model, process_group)
        self.model, self.process_group = model, process_group
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        model.to(self.device)
        self._replicas = Replicas(process_group, self.device) if process_group is not None else None
        self.rank = self._replicas.rank if self._replicas is not None else 0
        self.world_size = self._replicas.world_size if self._replicas is not None else 1
        if isinstance(task, Task):
            self.loaders = task.loaders(seed, rank=self.rank, world_size=self.world_size)
            self.loss, self.counts = loss or task.loss, counts or task.counts
        else:
            missing = {"train", "val"} - set(task)
            if missing:
                raise ValueError(f"loaders need the splits train and val; missing: {', '.join(sorted(missing))}")
            self.loaders = dict(task)
            self.loss, self.counts = loss or classification_loss, counts or classification_counts
        self.perplexity = isinstance(task, Task) and task.perplexity
        self._forward: nn.Module = model  # what training calls: the model, or its DDP wrapper
        if self._replicas is not None:
            self._forward = wrapper if wrapper is not None else self._replicas.wrap(model)
        self.optimizer = make_optimizer(model, lr, optimizer, **dict(optimizer_options or {}))
        self.scheduler = make_scheduler(self.optimizer, schedule, warmup_steps, steps)
        self.steps, self.eval_every, self.save_every, self.seed = steps, eval_every, save_every, seed
        self.save_interval = eval_every if save_every == AUTO else save_every  # auto: until the first write is timed
        self.save_plan: SavePlan | None = None  # what save_every="auto" chose, once a checkpoint was timed
        self._write_seconds: list[float] = []  # this trainer's measured checkpoint writes
        self._step_time, self._timed_steps = 0.0, 0  # optimizer steps' seconds, validation and saving left out
        self.schedule, self.warmup_steps, self.max_grad_norm = schedule, warmup_steps, max_grad_norm
        self.accumulate, self.precision, self.eval_batches = accumulate, precision, eval_batches
        self._trainable = [p for group in self.optimizer.param_groups for p in group["params"]]
        self._logs_lr = schedule != "constant" or warmup_steps > 0  # the lr varies over the run
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
        self.eval_time = 0.0  # seconds spent validating, over every fit of this trainer
        self.saved_bytes: int | None = None  # autograd's saved bytes on this trainer's first micro-batch (_backward)
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
        """Load the newest valid checkpoint (model, optimizer, lr schedule, RNGs, data position); False if none.

        Under a process group every rank must call it: rank 0 picks the checkpoint, every rank
        loads it and restores its own RNG and data position.

        Raises:
            ValueError: the checkpoint was written by another number of processes.
        """
        if self._manager is None:
            return False
        if self._replicas is None:
            progress = self._manager.resume(self.model, self.optimizer)
        else:
            progress = self._replicas.resume(self._manager, self.model, self.optimizer)
        if progress is None:
            return False
        extra = progress["extra"]
        if extra.get("world_size", 1) != self.world_size:
            raise ValueError(f"{progress['path']} was written by a run on {extra.get('world_size', 1)} process(es), "
                             f"this one has {self.world_size}; resume it on as many (torchrun --nproc-per-node "
                             f"{extra.get('world_size', 1)}) so its data order and random states continue exactly")
        loader = extra["loader"]
        if self._replicas is not None:  # each rank's own states, gathered to rank 0 when it saved (``_save``)
            restore_rng(extra["ranks"][self.rank]["rng"])
            loader = extra["ranks"][self.rank]["loader"]
        self.step, self.epoch = progress["step"], extra["epoch"]
        scheduler = extra.get("scheduler")
        if scheduler is None:  # a checkpoint from before schedules: its lr was constant, the optimizer state has it
            scheduler = {**self.scheduler.state_dict(), "last_epoch": self.step, "_step_count": self.step + 1,
                         "_last_lr": [group["lr"] for group in self.optimizer.param_groups]}
        self.scheduler.load_state_dict(scheduler)
        self.loaders["train"].load_state_dict(loader)
        self.recent_losses.extend(extra["losses"])
        self.last_metrics = dict(progress["metrics"])
        self._truncate_log(self.step)
        return True

    # -- the loop -----------------------------------------------------------------------------

    def fit(self, resume: bool = False) -> str:
        """Train until ``steps``; returns the status: "finished", "stopped" or "diverged".

        With ``resume=True`` training continues from the newest valid checkpoint exactly: the
        same losses, parameters and optimizer state as a run that was never interrupted.
        A non-finite loss (or, with clipping, gradient norm) ends the run before that step is applied
        or saved, so no checkpoint ever holds a diverged state; ``trainer.message`` says at which step. When ``fit``
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
                   desc=self.progress_label, dynamic_ncols=True)
        self.model.train()  # once: evaluate() puts the mode back as it found it
        try:
            while self.step < self.steps:
                started = time.perf_counter()
                self.optimizer.zero_grad(set_to_none=True)
                value, asked = self._backward()
                logged = {"loss": value}
                diverged = None if math.isfinite(value) else f"the loss became {value}"
                if diverged is None and self.max_grad_norm is not None:
                    norm = torch.nn.utils.clip_grad_norm_(self._trainable, self.max_grad_norm).item()
                    logged["grad_norm"] = norm  # before clipping; the same on every rank (gradients all-reduced)
                    diverged = None if math.isfinite(norm) else f"the gradient norm became {norm}"
                if diverged is not None:
                    self.status = "diverged"
                    self.message = (f"training stopped: {diverged} at step {self.step + 1}; lower the learning "
                                    "rate. Checkpoints hold only states from before it.")
                    break
                if self._logs_lr:
                    logged["lr"] = self.optimizer.param_groups[0]["lr"]  # the lr this step uses
                self.optimizer.step()
                self.scheduler.step()
                self.step += 1
                self._step_time += time.perf_counter() - started
                self._timed_steps += 1
                self.recent_losses.append(value)
                self._log(self.step, "train", logged)
                for callback in self.callbacks:
                    callback.on_step(self, value)
                at_end = self.step == self.steps
                stopping = self._stop.is_set() if self._replicas is None else asked  # agreed on as the step began
                saving = at_end or self.step % self.save_interval == 0 or stopping
                if at_end or saving or self.step % self.eval_every == 0:
                    self._validate(self.step)
                    if not stopping and self._replicas is None and self._stop.is_set():  # asked at this validation
                        stopping = saving = True  # (a search's pruner): end here, where the metrics are
                if saving:
                    self._save(stages.FINETUNED if at_end else None)
                    stopping = stopping or (self._replicas is None and self._stop.is_set())  # asked by on_save
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
            try:
                if self.checkpoints is not None:
                    self.checkpoints.close()  # waits for a pending save; another process may write here now
            finally:
                self._take_costs()
                self._flush_log()
        if self._replicas is not None:
            self._replicas.barrier()  # rank 0's last checkpoint is on disk for every rank
        for callback in self.callbacks:
            callback.on_end(self)
        return self.status

    def _shown_metric(self) -> dict[str, str]:
        value = self.last_metrics.get(self.monitor)
        return {} if value is None else {self.monitor: f"{value:.4f}"}

    def _backward(self) -> tuple[float, bool]:
        """Forward and backward over ``accumulate`` micro-batches: (the step's loss, whether a rank asked to stop).

        The loss is (1/K) sum_m L_m, each L_m the micro-batch's mean (under a process group, the
        whole global micro-batch's), and the gradients are left summed in ``.grad``; a non-finite
        L_m ends the step there, its loss returned, nothing more back-propagated.
        """
        total, asked = 0.0, False
        for micro in range(self.accumulate):
            inputs, targets = self._next_batch()
            last = micro == self.accumulate - 1
            syncing = self._replicas is None or last  # DDP all-reduces the summed gradients at the last backward
            measuring = self.saved_bytes is None  # the first micro-batch is measured as it trains: no extra forward
            with contextlib.nullcontext() if syncing else self._forward.no_sync():
                with autocast(self.precision, self.device), \
                        saved_activations(self.model) if measuring else contextlib.nullcontext() as saved:
                    outputs = self._forward(inputs)
                    loss = self.loss(outputs, targets)
                if measuring:
                    self.saved_bytes = saved.bytes
                value = loss.item()
                if self._replicas is not None:  # the whole micro-batch's loss, this rank's weight of it, a stop
                    agreed = self._replicas.agree(value, self.counts(outputs.detach(), targets)[1], self._stop.is_set())
                    value, loss, asked = agreed.loss, loss * agreed.weight, asked or agreed.stop
                if not math.isfinite(value):
                    return value, asked
                (loss if self.accumulate == 1 else loss / self.accumulate).backward()
            total += value
        return total / self.accumulate, asked

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

    def evaluate(self, split: str = "val", batches: int | None = None) -> dict[str, float]:
        """Mean loss and accuracy over a split: ``{"<split>_loss": ..., "<split>_acc": ...}``, and
        ``"<split>_ppl"`` for a language-model task.

        Over its first ``batches`` batches, or (None) all of them; in the trainer's ``precision``.
        """
        if split not in self.loaders:
            raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(self.loaders)}")
        return evaluate(self.model, self.loaders[split], self.loss, self.counts, split, self.device, self.process_group,
                        batches=batches, precision=self.precision, perplexity=self.perplexity)

    def _validate(self, step: int) -> None:
        """Evaluate on "val" (its first ``eval_batches``), log it, tell the callbacks; the monitor must be recorded."""
        start = time.perf_counter()
        metrics = self.evaluate("val", self.eval_batches)
        self.eval_time += time.perf_counter() - start
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
        self._save(stages.SVD_INIT)

    def _save(self, stage: str | None = None) -> None:
        if self._manager is None:
            return
        ranks = None  # under a group: every rank's RNG and loader states, in rank order, on rank 0
        if self._replicas is not None:
            ranks = self._replicas.gather({"rng": capture_rng(), "loader": self.loaders["train"].state_dict()})
        if self.checkpoints is None:
            return
        extra = {"loader": self.loaders["train"].state_dict(), "epoch": self.epoch, "losses": list(self.recent_losses),
                 "scheduler": self.scheduler.state_dict()}
        if ranks is not None:
            extra |= {"world_size": self.world_size, "ranks": ranks}
        self._flush_log()
        path = self.checkpoints.save(self.step, self.model, self.optimizer, metrics=self.last_metrics, stage=stage,
                                     extra=extra)
        self._take_costs()
        for callback in self.callbacks:
            callback.on_save(self, path)

    def _take_costs(self) -> None:
        """Log the write cost of each checkpoint now on disk; with save_every="auto", plan the interval anew."""
        if self.checkpoints is None:
            return
        for cost in self.checkpoints.take_costs():
            self._write_seconds.append(cost.seconds)
            self._log(cost.step, "checkpoint", {"write_time": cost.seconds, "bytes": cost.bytes})
        if self.mtbf is not None and self._write_seconds and self._timed_steps:
            self.save_plan = plan(sum(self._write_seconds) / len(self._write_seconds),
                                  self._step_time / self._timed_steps, self.mtbf, self.eval_every)
            self.save_interval = self.save_plan.steps

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


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    counts: Callable[[torch.Tensor, torch.Tensor], tuple[int, int]],
    split: str = "val",
    device: torch.device | str | None = None,
    process_group: dist.ProcessGroup | None = None,
    *,
    batches: int | None = None,
    precision: str = "float32",
    perplexity: bool = False,
) -> dict[str, float]:
    """``{"<split>_loss": L, "<split>_acc": A}`` over every batch of ``loader``, the model in eval mode.

    L = sum_b loss_b * n_b / sum_b n_b, with n_b the targets counted in batch b, and A = correct / counted;
    with ``perplexity``, also ``"<split>_ppl"`` = exp(L) (L the mean next-token cross-entropy).
    Under a process group the three sums are reduced over all ranks first. ``batches``: over the
    first so many batches only (None: all); ``precision``: forward and loss under ``autocast(precision)``.

    Evaluating leaves torch's RNG as it found it (a data loader draws its seed from it), so
    validating more or less often never changes how a run trains. It runs under
    ``torch.inference_mode``: no autograd bookkeeping at all (on reviews 1.0-1.1x the speed of
    ``no_grad``, within this machine's run-to-run noise; ``benchmarks/evaluation.py``).
    """
    was_training = model.training
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64)  # loss sum, correct, counted
    cuda = [device] if device is not None and torch.device(device).type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        for inputs, targets in itertools.islice(loader, batches):
            if device is not None:
                inputs, targets = inputs.to(device), targets.to(device)
            with autocast(precision, device if device is not None else inputs.device):
                outputs = model(inputs)
                value = loss(outputs, targets).item()
            correct, counted = counts(outputs, targets)
            totals += torch.tensor([value * counted, correct, counted], dtype=torch.float64)
    if process_group is not None:
        totals = sum_over_ranks(totals, process_group, device)
    model.train(was_training)
    loss_sum, correct, counted = totals.tolist()
    metrics = {f"{split}_loss": loss_sum / max(counted, 1), f"{split}_acc": correct / max(counted, 1)}
    if perplexity:
        metrics[f"{split}_ppl"] = math.exp(min(metrics[f"{split}_loss"], MAX_LOG_PERPLEXITY))
    return metrics


def evaluate_task(model: nn.Module, task: Task, loader: DataLoader, split: str, precision: str = "float32"
                  ) -> dict[str, float]:
    """``evaluate`` with the task's loss, counts and perplexity."""
    return evaluate(model, loader, task.loss, task.counts, split, precision=precision, perplexity=task.perplexity)


def held_out_metrics(model: nn.Module, task: Task, loaders: Mapping[str, DataLoader], precision: str = "float32"
                     ) -> dict[str, float]:
    """The metrics of every split but train and val: test, and those a task adds (a language model's "forget")."""
    metrics: dict[str, float] = {}
    for split, loader in loaders.items():
        if split not in ("train", "val"):
            metrics |= evaluate_task(model, task, loader, split, precision)
    return metrics


def lr_factor(schedule: str, step: int, warmup_steps: int, steps: int) -> float:
    """f(s): what the base lr is multiplied by for the optimizer step that follows ``step`` = s steps done.

    With W = ``warmup_steps`` and T = ``steps`` (the formulas of transformers' ``get_scheduler``:
    "constant_with_warmup", "linear", "cosine" with half a cycle)::

        f(s) = s / W                                         while s < W
        f(s) = 1                                             "constant"
        f(s) = max(0, (T - s) / (T - W))                     "linear"
        f(s) = max(0, (1 + cos(pi (s - W) / (T - W))) / 2)   "cosine"
    """
    if step < warmup_steps:
        return step / warmup_steps
    if schedule == "constant":
        return 1.0
    if schedule == "linear":
        return max(0.0, (steps - step) / max(1, steps - warmup_steps))
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * (step - warmup_steps) / max(1, steps - warmup_steps))))


def check_schedule(schedule: object, warmup_steps: object, steps: int) -> None:
    """Refuse a schedule ``lr_factor`` does not know, or a warmup it cannot follow in ``steps`` steps.

    Raises:
        ValueError: an unknown schedule (naming the valid ones), warmup_steps not an integer >= 0,
            or, for "linear" and "cosine", not fewer than ``steps`` (they would never decay).
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; valid schedules: {', '.join(SCHEDULES)}")
    if not is_integer(warmup_steps) or warmup_steps < 0:
        raise ValueError(f"warmup_steps must be an integer >= 0, not {warmup_steps!r}")
    if schedule != "constant" and warmup_steps >= steps:
        raise ValueError(f"warmup_steps ({warmup_steps}) must be fewer than steps ({steps}) for schedule "
                         f"{schedule!r}, which decays the lr to 0 at the last step after the warmup; schedule "
                         "'constant' may warm up over the whole run")


def make_scheduler(optimizer: torch.optim.Optimizer, schedule: str, warmup_steps: int, steps: int) -> LambdaLR:
    """A ``LambdaLR`` that sets every group's lr to its own base lr times ``lr_factor(schedule, s, ...)``.

    Made before any step, it sets the lrs of the first (s = 0); ``scheduler.step()`` after each
    optimizer step moves them on. Its ``state_dict()`` is numbers only (the factor is a plain function).
    """
    check_schedule(schedule, warmup_steps, steps)
    return LambdaLR(optimizer, lambda step: lr_factor(schedule, step, warmup_steps, steps))


def autocast(precision: str, device: torch.device | str) -> contextlib.AbstractContextManager[Any]:
    """What forward and loss run under: nothing for "float32", bf16 autocast on ``device``'s type for "bf16".

    Raises:
        ValueError: an unknown precision, naming the valid ones.
    """
    if check_precision(precision) == "float32":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)


def check_precision(precision: object) -> str:
    """``precision`` if it is one of ``PRECISIONS``.

    Raises:
        ValueError: another value, naming the valid ones.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; valid precisions: {', '.join(PRECISIONS)}")
    return precision


def check_seed(seed: object) -> int:
    """``seed`` if it is an integer in [0, 2**63 - 1], which torch's generators take whatever is added to it.

    Raises:
        ValueError: another value, naming the valid range.
    """
    if not is_integer(seed) or not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seed must be an integer from 0 to 2**63 - 1, not {seed!r}")
    return seed




def _svd_initialised(model: nn.Module) -> bool:
    """Whether ``model``'s adapters were initialised from the SVD of the weights (``init="pissa"``)."""
    try:
        return adapter_config(model).options.get("init") == "pissa"
    except ValueError:  # a model trained without adapters
        return False

