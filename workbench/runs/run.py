"""``Run``: one training run of a variant at a rank (or of a baseline) on a task, written to its own directory."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ..adapt import trainable_parameters
from ..checkpoints import CheckpointManager
from ..checks import is_integer
from ..memory import PeakResident, peak_resident
from ..save_interval import check_save_every
from ..targets import target_patterns
from ..tasks import Task, get_task
from ..trainer import Callback, Trainer, held_out_metrics
from .layout import (
    PRUNED,
    RunRecord,
    build_model,
    checkpoints_path,
    is_run,
    metrics_path,
    read_record,
    resolve_settings,
    run_arguments,
    task_of,
    write_record,
)


class Run:
    """One training run of a variant at a rank on a task, written to its own directory.

    ``Run(...)`` checks every setting and builds the adapted model; ``fit()`` trains it and
    records the outcome; ``stop()`` (from any thread) ends it with a checkpoint. A run
    directory that exists already is resumed with ``resume=True`` (skipped if finished) and
    refused otherwise.

    Args:
        task: a task name (``wb.tasks.TASKS``) or a ``wb.tasks.Task``.
        variant, rank, alpha, targets, train, **options: as for ``wb.add_adapters``; targets default
            to the task's. ``variant`` may also be a baseline (``wb.BASELINES``): ``"full"`` trains
            every parameter of the base model, ``"head"`` only the ``train`` modules (default the
            task's ``default_train``) on a frozen base; a baseline takes ``rank=None`` and no alpha,
            targets or options (see ``workbench.baselines``), e.g.
            ``wb.Run("digits", "head", None, "runs/head", train=["head"])``.
        out: the run directory.
        lr, optimizer: see ``wb.make_optimizer``.
        steps, eval_every, save_every, seed, callbacks, progress_bar: see ``wb.Trainer``.
        schedule, warmup_steps, max_grad_norm, accumulate, precision, eval_batches: see ``wb.Trainer``
            (e.g. ``schedule="cosine", warmup_steps=30, max_grad_norm=1.0, accumulate=4``); recorded
            in the settings like the others, so a resume with other values is refused. The test
            metrics are measured in the run's precision too.
        keep_last, keep_best, monitor, mode: see ``wb.CheckpointManager``; the mode is inferred from the
            monitor's name when not given (``"max"`` for ``val_acc``).
        mtbf: with ``save_every="auto"``, the expected time between failures, e.g. ``"4h"`` (see ``wb.Trainer``);
            the record's ``save_plan`` says which interval was chosen and why.
        extend: with ``resume=True``, the run may go on to more ``steps`` than it recorded (``wb.resume_run``).
        progress_label: the progress bar's name (default the run directory's; a sweep's "trial i/N <run>").
        compression: a compressed base, ``{"ranks": {layer: k}}`` (``wb.compress_task`` writes it; more keys
            may say how the ranks were chosen): the task's base is factorised at those ranks
            (``workbench.compress.factorize``) before adapters go on, e.g. ``targets=["up", "down"]``
            (the factors), or ``"head"`` with the factors in ``train=``.
        process_group, device: data-parallel training (see ``wb.Trainer``): every process of the
            group makes the same ``Run`` and calls ``fit``; only rank 0 writes the directory.
    """

    def __init__(
        self,
        task: str | Task,
        variant: str,
        rank: int | None,
        out: str | os.PathLike[str],
        *,
        alpha: float | None = None,
        targets: str | Sequence[str] | None = None,
        train: str | Sequence[str] | None = None,
        lr: float = 3e-3,
        optimizer: str = "adamw",
        steps: int = 300,
        eval_every: int = 50,
        save_every: int = 50,
        seed: int = 0,
        keep_last: int | None = None,
        keep_best: int | None = None,
        monitor: str = "val_loss",
        mode: str | None = None,
        resume: bool = False,
        callbacks: Sequence[Callback] = (),
        progress_bar: bool = True,
        process_group: dist.ProcessGroup | None = None,
        device: torch.device | str | None = None,
        schedule: str = "constant",
        warmup_steps: int = 0,
        max_grad_norm: float | None = None,
        accumulate: int = 1,
        precision: str = "float32",
        eval_batches: int | None = None,
        mtbf: float | str | None = None,
        compression: dict[str, Any] | None = None,
        extend: bool = False,
        progress_label: str | None = None,
        **options: Any,
    ) -> None:
        self.task = get_task(task) if isinstance(task, str) else task
        self.path = Path(out)
        if self.path.exists() and not self.path.is_dir():
            raise ValueError(f"{self.path} is a file; a run needs a directory (a new one, or a run's to resume)")
        self.settings = resolve_settings(self.task, {
            "task": self.task.name, "task_source": self.task.source, "variant": variant, "rank": rank, "alpha": alpha,
            "targets": target_patterns(targets), "train": target_patterns(train, what="train"),
            "options": options, "lr": lr, "optimizer": optimizer, "steps": steps, "eval_every": eval_every,
            "save_every": save_every, "seed": seed, "batch_size": self.task.batch_size,
            "keep_last": keep_last, "keep_best": keep_best, "monitor": monitor, "mode": mode,
            "schedule": schedule, "warmup_steps": warmup_steps, "max_grad_norm": max_grad_norm,
            "accumulate": accumulate, "precision": precision, "eval_batches": eval_batches,
            "mtbf": check_save_every(save_every, mtbf), "compression": compression,
        })
        self.record: RunRecord = {}
        self.resume = resume
        self._pruned: str | None = None  # why a search pruned it (``prune``)
        if is_run(self.path):
            self.record = read_record(self.path)
            if not resume:
                raise ValueError(f"{self.path} holds a run already; resume it (resume=True) or choose "
                                 "another directory")
            there = resolve_settings(self.task, self.record["settings"])
            changed = [f"{k}: {there.get(k)!r} there, {v!r} here" for k, v in self.settings.items()
                       if there.get(k) != v and not (extend and k == "steps")]
            if changed:
                raise ValueError(f"{self.path} holds a different run; it differs in " + "; ".join(changed))
        self._made = [p for p in (checkpoints_path(self.path), self.path, *self.path.parents) if not p.exists()]
        try:
            self.model = build_model(self.task, self.settings)
            self.checkpoints = CheckpointManager(checkpoints_path(self.path), keep_last, keep_best,
                                                 self.settings["monitor"], self.settings["mode"],
                                                 run_config=self.settings)
            self.trainer = Trainer(self.model, self.task, lr=lr, optimizer=optimizer, steps=steps,
                                   eval_every=eval_every, save_every=save_every, checkpoints=self.checkpoints,
                                   metrics_log=metrics_path(self.path), seed=seed, callbacks=callbacks,
                                   progress_bar=progress_bar, monitor=monitor, process_group=process_group,
                                   device=device, schedule=schedule, warmup_steps=warmup_steps,
                                   max_grad_norm=max_grad_norm, accumulate=accumulate, precision=precision,
                                   eval_batches=eval_batches, mtbf=mtbf,
                                   progress_label=progress_label or self.path.name)
        except BaseException:
            self.discard()  # a rejected run leaves nothing behind
            raise

    def discard(self) -> None:
        """Remove the directories this ``Run`` created while they are still empty, deepest first.

        For a run that is refused or never started; once anything is written there (a record, a
        checkpoint), its directories stay.
        """
        for directory in sorted(self._made, key=lambda p: len(p.parts), reverse=True):
            if directory.is_dir() and not any(directory.iterdir()):
                directory.rmdir()

    @property
    def finished(self) -> bool:
        """Whether the run has trained all its ``steps`` (an extended run has not, until it is resumed)."""
        return (self.record.get("status") == "finished"
                and self.record.get("steps_done", self.settings["steps"]) >= self.settings["steps"])

    def stop(self) -> None:
        """End a running ``fit`` safely: a checkpoint is saved first. Safe from any thread."""
        self.trainer.stop()

    def prune(self, message: str) -> None:
        """End the run as pruned by a search, ``message`` saying why: during ``fit`` (from a callback's
        ``on_evaluate``) at that validation, with a checkpoint there; before ``fit``, as it stands on disk."""
        self._pruned = message
        if self.trainer.status == "running":
            self.trainer.stop()
        else:
            mark_pruned(self.path, message)

    def fit(self) -> dict[str, Any]:
        """Train (or resume, or skip a finished run) and write the outcome; returns the run's record.

        The record's ``eval_time`` is the part of ``wall_time`` spent evaluating: validation, and
        the test of the best checkpoint (its rebuild included). Its ``peak_rss`` is the process's
        peak resident memory while the trainer ran (``workbench.memory.peak_resident``), the larger
        of this fit's and an earlier one's of the run; None where it cannot be measured.
        """
        if self.finished:
            return self.record
        group, writer = self.trainer.process_group, self.trainer.is_writer
        if group is not None:
            dist.barrier(group=group)  # every rank has read the directory before rank 0 changes it
        self.path.mkdir(parents=True, exist_ok=True)
        self.record = {
            "settings": self.settings,
            "status": "running",
            "trainable": trainable_parameters(self.model),
            "parameters": sum(p.numel() for p in self.model.parameters()),
            "saved_bytes": self.record.get("saved_bytes"),
            "started": self.record.get("started", datetime.now(UTC).isoformat(timespec="seconds")),
            "wall_time": self.record.get("wall_time", 0.0),
            "eval_time": self.record.get("eval_time", 0.0),
            "peak_rss": self.record.get("peak_rss"),
        }
        if group is not None:
            self.record["processes"] = self.trainer.world_size
        if writer:
            write_record(self.path, self.record)
        start, validating = time.perf_counter(), self.trainer.eval_time
        peak = PeakResident()  # its bytes stay None if the trainer fails: the block never ended
        try:
            with peak_resident() as peak:
                status = self.trainer.fit(resume=self.resume)
        except BaseException as error:
            self.record.update(status="failed", message=f"{type(error).__name__}: {error}")
            raise
        else:
            if status == "stopped" and self._pruned is not None:
                status, self.trainer.message = PRUNED, self._pruned
            self.record.update(status=status, message=self.trainer.message, steps_done=self.trainer.step)
            if status == "finished" and writer:
                testing = time.perf_counter()
                self.record["test"] = self._test_best()
                self.record["eval_time"] += time.perf_counter() - testing
        finally:
            self.record["wall_time"] += time.perf_counter() - start
            self.record["eval_time"] += self.trainer.eval_time - validating
            if self.trainer.save_plan is not None:
                self.record["save_plan"] = self.trainer.save_plan.as_dict()
            if self.record["saved_bytes"] is None:  # measured on the trainer's first micro-batch, kept from then on
                self.record["saved_bytes"] = self.trainer.saved_bytes
            measured = [b for b in (self.record["peak_rss"], peak.bytes) if b is not None]
            self.record["peak_rss"] = max(measured) if measured else None
            self.checkpoints.close()
            if writer:
                write_record(self.path, self.record)
        return self.record

    def _test_best(self) -> dict[str, Any]:
        best = self.checkpoints.best()
        if best is None:
            return {}
        model = build_model(self.task, self.settings)
        progress = self.checkpoints.load(best, model)
        loaders = self.task.loaders(self.settings["seed"])
        return {"checkpoint": best.name, "step": progress["step"],
                **held_out_metrics(model, self.task, loaders, self.trainer.precision)}


def train(task: str | Task, variant: str, rank: int | None, out: str | os.PathLike[str], **settings: Any) -> Path:
    """Train one run (see ``Run`` for the settings; rank None for a baseline) and return its directory."""
    Run(task, variant, rank, out, **settings).fit()
    return Path(out)


def mark_pruned(run: str | os.PathLike[str], message: str, steps_done: int | None = None) -> None:
    """Record a run that a search stopped early as "pruned", ``message`` saying why (and where it stopped)."""
    record = read_record(Path(run))
    record.update(status=PRUNED, message=message)
    if steps_done is not None:
        record["steps_done"] = steps_done
    write_record(Path(run), record)


def resume_run(run: str | os.PathLike[str], steps: int | None = None, *, task: Task | None = None,
               callbacks: Sequence[Callback] = (), progress_bar: bool = True) -> RunRecord:
    """Continue a run from its newest checkpoint to ``steps`` (default: the steps it recorded), as the same run.

    For a pruned, stopped or failed run, or a finished one given more steps: the trainer resumes its
    newest checkpoint exactly (model, optimizer, schedule, random and data states), so the run ends as
    one that never stopped and had been asked for ``steps`` from the start; its metrics log, record
    and row of the runs table continue. A run on your own task rebuilds it from its recorded files, or
    takes ``task``. Returns the run's record.

    Raises:
        ValueError: not a run; steps fewer than it has done, or not more than a finished run's; more steps
            under a schedule that decays to the recorded last step ("linear", "cosine"), which a longer run
            would have decayed differently; a task that is not the run's.
    """
    path = Path(run)
    record = read_record(path)
    settings = record["settings"]
    done = record.get("steps_done", 0)
    steps = settings["steps"] if steps is None else steps
    if not is_integer(steps) or steps < max(done, 1):
        raise ValueError(f"steps must be an integer at least the {done} steps {path.name} has done, not {steps!r}")
    if record.get("status") == "finished" and steps <= done:
        raise ValueError(f"{path.name} has finished its {done} steps: give more steps to continue it (steps > {done})")
    if steps != settings["steps"] and settings["schedule"] != "constant":
        raise ValueError(f"{path.name} trains with a {settings['schedule']} schedule that decays to 0 at step "
                         f"{settings['steps']}; a run of {steps} steps would have decayed differently from the start, "
                         "so it cannot be continued exactly: train a new run of that length")
    return Run(task_of(settings, task), **run_arguments({**settings, "steps": steps}), out=path, resume=True,
               extend=True, callbacks=callbacks, progress_bar=progress_bar).fit()
