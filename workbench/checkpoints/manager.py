"""``CheckpointManager``: a directory of checkpoints, written safely, listed, kept and pruned."""

from __future__ import annotations

import json
import os
import re
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from filelock import FileLock, Timeout
from safetensors import SafetensorError
from torch import nn

from .files import remove_directory, remove_strays, write_directory
from .snapshot import PROGRESS_FILE, CheckpointError, Snapshot, capture, load_checkpoint, verify

_NAME = re.compile(r"step-(\d+)")
LOCK_FILE = ".lock"


class CheckpointManager:
    """The checkpoints of one run, in one directory, one subdirectory per step (``step-00000050``).

    Args:
        directory: where the checkpoints live; created if missing.
        keep_last: keep the newest ``keep_last`` checkpoints. Example: ``keep_last=3``.
        keep_best: keep the ``keep_best`` best by ``monitor``. Example: ``keep_best=1, monitor="val_acc", mode="max"``.
        monitor: the metric that ranks checkpoints for ``keep_best`` and ``best()``.
        mode: ``"min"`` (lower is better, as for a loss) or ``"max"`` (as for an accuracy).
        async_save: write in a background thread: ``save`` copies the tensors and returns at
            once; at most one save is in flight; a failed write raises at the next call.
        run_config: the run's configuration (task, seed, learning rate, ...), JSON-able; every
            checkpoint records it beside the adapter configuration it reads off the model.

    Retention: with neither ``keep_last`` nor ``keep_best`` set nothing is ever pruned. Otherwise,
    after each save is in place, a checkpoint is deleted unless it is among the newest
    ``keep_last``, the best ``keep_best``, is the newest of all (so a run can always resume),
    or carries a stage label ("svd-init", "rank-reduced", "finetuned", ...): those are never pruned.

    Writing takes a lock file in the directory, so a second process (or manager) that tries to
    write there gets a ``CheckpointError``; reading (``list``, ``best``, ``load``) needs no lock.
    The first write also removes temporary directories that a crash left behind.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        keep_last: int | None = None,
        keep_best: int | None = None,
        monitor: str = "val_loss",
        mode: str = "min",
        async_save: bool = False,
        run_config: dict[str, Any] | None = None,
    ) -> None:
        for name, value in (("keep_last", keep_last), ("keep_best", keep_best)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"{name} must be None (keep all) or an integer >= 1, not {value!r}")
        _check_mode(mode)
        if not isinstance(monitor, str) or not monitor:
            raise ValueError(f"monitor must be a metric name such as 'val_loss', not {monitor!r}")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.keep_last, self.keep_best, self.monitor, self.mode = keep_last, keep_best, monitor, mode
        self.async_save = async_save
        self.run_config = dict(run_config or {})
        self._lock = FileLock(self.directory / LOCK_FILE, timeout=0)
        self._executor: ThreadPoolExecutor | None = None
        self._pending: Future[None] | None = None

    # -- writing ------------------------------------------------------------------------------

    def _take_lock(self) -> None:
        if self._lock.is_locked:
            return
        try:
            self._lock.acquire()
        except Timeout:
            raise CheckpointError(
                f"{self.directory}: another process is writing checkpoints here (lock {self._lock.lock_file}); "
                "use another directory or stop that process"
            ) from None
        remove_strays(self.directory)

    def path_for(self, step: int) -> Path:
        """Where the checkpoint of ``step`` lives."""
        return self.directory / f"step-{step:08d}"

    def save(
        self,
        step: int,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        metrics: dict[str, float] | None = None,
        stage: str | None = None,
        extra: dict[str, Any] | None = None,
        full: bool = False,
    ) -> Path:
        """Write a checkpoint of ``step``; returns its path (with ``async_save``, where it will be).

        Args:
            step: the training step, an integer >= 0; one checkpoint per step.
            model: the model; by default only the tensors training changes are written.
            optimizer: its whole state is written too.
            metrics: e.g. ``{"val_loss": 0.31, "val_acc": 0.9}``; ranks checkpoints for keep_best.
            stage: a label such as ``"finetuned"``; staged checkpoints are never pruned.
            extra: more state to resume from: data loader ``state_dict()``, epoch, recent
                losses, run configuration. Tensors, numbers, strings, lists, dicts, NumPy arrays.
            full: write every tensor of the model, not only the trained ones.

        Raises:
            CheckpointError: the step has a checkpoint already, another process holds the
                directory, or the write failed (previous checkpoints are untouched).
        """
        self._finish_pending()
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise ValueError(f"step must be an integer >= 0, not {step!r}")
        self._take_lock()
        path = self.path_for(step)
        if path.exists():
            raise CheckpointError(f"{path}: a checkpoint of step {step} exists already; delete it first")
        snapshot = capture(step, model, optimizer, metrics, stage, extra, full, self.run_config, copy=self.async_save)
        if not self.async_save:
            self._write(snapshot, path)
            return path
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint")
        self._pending = self._executor.submit(self._write, snapshot, path)
        return path

    def _write(self, snapshot: Snapshot, path: Path) -> None:
        try:
            write_directory(path, snapshot.write)
        except (OSError, SafetensorError) as error:  # safetensors reports a failed write as its own error
            raise CheckpointError(f"{path}: could not be written ({error}); earlier checkpoints are intact") from error
        self._prune()

    def _finish_pending(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()  # re-raises the background write's error here

    def wait(self) -> None:
        """Block until an asynchronous save is on disk; raises its error if it failed."""
        self._finish_pending()

    def close(self) -> None:
        """Finish any pending save and release the directory's lock."""
        try:
            self._finish_pending()
        finally:
            if self._executor is not None:
                self._executor.shutdown()
                self._executor = None
            if self._lock.is_locked:
                self._lock.release()

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def delete(self, path_or_step: int | str | os.PathLike[str]) -> None:
        """Delete one checkpoint of this directory (staged ones too: this is explicit)."""
        self._finish_pending()
        self._take_lock()
        path = self._resolve(path_or_step)
        if path.parent.resolve() != self.directory.resolve() or not _NAME.fullmatch(path.name):
            raise CheckpointError(f"{path}: not a checkpoint of {self.directory}")
        if not path.is_dir():
            raise CheckpointError(f"{path}: no such checkpoint")
        remove_directory(path)

    def _prune(self) -> None:
        if self.keep_last is None and self.keep_best is None:
            return
        records = self._records()
        keep = {records[-1]["path"]} if records else set()
        keep |= {r["path"] for r in records if r["stage"]}
        if self.keep_last is not None:
            keep |= {r["path"] for r in records[-self.keep_last :]}
        if self.keep_best is not None:
            keep |= {r["path"] for r in self._ranked(records, self.monitor, self.mode)[: self.keep_best]}
        for record in records:
            if record["path"] not in keep:
                remove_directory(record["path"])

    # -- reading ------------------------------------------------------------------------------

    def _step_directories(self) -> list[Path]:
        """The checkpoint directories by their names, oldest first, whatever state they are in."""
        paths = [p for p in self.directory.iterdir() if _NAME.fullmatch(p.name)]
        return sorted(paths, key=lambda p: int(_NAME.fullmatch(p.name).group(1)))

    def _records(self) -> list[dict[str, Any]]:
        """The complete checkpoints' summaries, oldest first (read from progress.json, unverified)."""
        records = []
        for path in self._step_directories():
            try:
                progress = json.loads((path / PROGRESS_FILE).read_text())
                size = sum(file.stat().st_size for file in path.iterdir())
            except (OSError, ValueError):
                continue  # vanished while listing, or not a readable checkpoint
            records.append({"step": progress["step"], "path": path, "stage": progress.get("stage"), "size": size,
                            "created": progress.get("created"), **progress.get("metrics", {})})
        return records

    @staticmethod
    def _ranked(records: list[dict[str, Any]], metric: str, mode: str) -> list[dict[str, Any]]:
        scored = [r for r in records if isinstance(r.get(metric), (int, float)) and r[metric] == r[metric]]
        return sorted(scored, key=lambda r: r[metric], reverse=(mode == "max"))

    def list(self) -> pd.DataFrame:
        """One row per complete checkpoint, oldest first: step, path, stage, size (bytes), created, metrics."""
        columns = ["step", "path", "stage", "size", "created"]
        records = self._records()
        frame = pd.DataFrame(records, columns=list(dict.fromkeys([*columns, *(k for r in records for k in r)])))
        frame["path"] = frame["path"].astype(str)
        return frame

    def latest(self) -> Path | None:
        """The newest checkpoint's path, or None."""
        records = self._records()
        return records[-1]["path"] if records else None

    def best(self, metric: str | None = None, mode: str | None = None) -> Path | None:
        """The best checkpoint by ``metric`` (default ``monitor``) and ``mode``, or None if none has it."""
        mode = _check_mode(mode or self.mode)
        ranked = self._ranked(self._records(), metric or self.monitor, mode)
        return ranked[0]["path"] if ranked else None

    def _resolve(self, path_or_step: int | str | os.PathLike[str]) -> Path:
        if isinstance(path_or_step, int) and not isinstance(path_or_step, bool):
            return self.path_for(path_or_step)
        return Path(path_or_step)

    def load(
        self,
        path_or_step: int | str | os.PathLike[str],
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        restore_random: bool = False,
    ) -> dict[str, Any]:
        """Load a checkpoint (by step, or any checkpoint's path) into ``model`` and ``optimizer``.

        Returns the progress dict: step, stage, metrics, lr, rng, extra, adapter, versions.
        ``restore_random=True`` also sets the global RNGs as they were at save time.

        Raises:
            CheckpointError: missing, not a checkpoint, corrupted, or not fitting the model.
        """
        self._finish_pending()
        return load_checkpoint(self._resolve(path_or_step), model, optimizer, restore_random)

    def resume(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[str, Any] | None:
        """Load the newest checkpoint that passes its checksums, RNGs included, to continue exactly.

        A newer checkpoint that fails verification is skipped with a warning saying why.
        Returns its progress, or None when there is no valid checkpoint (start from scratch).
        """
        self._finish_pending()
        for path in reversed(self._step_directories()):
            try:
                progress = verify(path)
            except CheckpointError as error:
                warnings.warn(f"not resuming from {path.name}: {error}; trying an older one", stacklevel=2)
                continue
            return load_checkpoint(path, model, optimizer, restore_random=True, verified=progress)
        return None


def _check_mode(mode: str) -> str:
    if mode not in ("min", "max"):
        raise ValueError(f"mode must be 'min' or 'max', not {mode!r}")
    return mode
