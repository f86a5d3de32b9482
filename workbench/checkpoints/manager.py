"""``CheckpointManager``: a directory of checkpoints, written safely, listed, kept and pruned."""

from __future__ import annotations

import os
import threading
import time
import warnings
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from filelock import FileLock, Timeout
from safetensors import SafetensorError
from torch import nn

from ..checks import is_integer
from ..selection import ranked, resolve_mode
from .files import remove_directory, remove_strays, set_aside, write_directory
from .snapshot import (
    CheckpointError,
    Snapshot,
    capture,
    checkpoint_name,
    load_checkpoint,
    refuse_merged,
    step_of,
    verify,
)

LOCK_FILE = ".lock"
CORRUPT_PREFIX = ".corrupt-"  # a checkpoint ``resume`` found damaged, set aside: never listed, never deleted

Signature = tuple[tuple[str, int, int], ...]  # every file's (name, size, mtime_ns), by name


@dataclass(frozen=True)
class WriteCost:
    """What one checkpoint cost to write: the seconds from ``save``'s capture of the state until the checkpoint
    was on disk (fsync and rename included, pruning not; with ``async_save``, most of it in the background),
    and the bytes of its files."""

    step: int
    seconds: float
    bytes: int


class CheckpointManager:
    """The checkpoints of one run, in one directory, one subdirectory per step (``step-00000050``).

    Args:
        directory: where the checkpoints live; created if missing.
        keep_last: keep the newest ``keep_last`` checkpoints. Example: ``keep_last=3``.
        keep_best: keep the ``keep_best`` best by ``monitor``. Example: ``keep_best=1, monitor="val_acc"``.
        monitor: the metric that ranks checkpoints for ``keep_best`` and ``best()``.
        mode: ``"min"`` (lower is better, as for a loss) or ``"max"`` (as for an accuracy); None
            (the default) infers it from the monitor's name (``wb.selection.metric_mode``): an
            accuracy such as ``val_acc`` is "max", a loss or anything else "min".
        async_save: write in a background thread: ``save`` copies the tensors and returns at
            once; at most one save is in flight; a failed write raises at the next call.
        run_config: the run's configuration (task, seed, learning rate, ...), JSON-able; every
            checkpoint records it beside the adapter configuration it reads off the model.

    Guarantees:

    - Only a valid checkpoint is ever shown: ``list``, ``best``, ``latest`` and pruning see only
      directories named ``step-<step, 8 digits>`` that pass ``verify`` (structure, names, sizes,
      SHA-256 of every file). Any other is left out with a warning naming it and why (once per
      state of its files). Verifications are cached for the process, keyed by the checkpoint's
      path and each file's name, size and modification time, so a changed file is checked again
      and an unchanged one is not re-hashed; a checkpoint this process wrote is known valid. (A
      change that keeps a file's size and time, such as bit rot on the disk, is seen by the next
      process, and always by ``load`` and ``resume``, which hash every file.)
    - ``resume`` loads the newest valid checkpoint; one that fails verification is moved aside
      to ``.corrupt-<name>-<8 hex>`` in the same directory (never deleted, never listed), with a
      warning naming where, so training can save that step again.
    - A checkpoint is never saved from a model whose adapters are merged (``ValueError``: it
      would load with the update applied twice).
    - ``best`` and ``keep_best`` rank by ``wb.selection``: NaN, infinities and non-numbers never rank.
    - Trouble with the files is a ``CheckpointError`` naming the path and why, a directory that is
      not writable included; bad arguments are a ``ValueError`` naming the valid values.

    Retention: with neither ``keep_last`` nor ``keep_best`` set nothing is ever pruned. Otherwise,
    after each save is in place, a valid checkpoint is deleted unless it is among the newest
    ``keep_last``, the best ``keep_best``, is the newest of all (so a run can always resume),
    or carries a stage label ("svd-init", "rank-reduced", "finetuned", ...): those are never pruned.
    A checkpoint that fails verification is never pruned either.

    Writing takes a lock file in the directory, so a second process (or manager) that tries to
    write there gets a ``CheckpointError``; reading (``list``, ``best``, ``load``) needs no lock.
    The first write also removes temporary directories that a crash left behind (never a
    ``.corrupt-`` one).

    Raises:
        ValueError: a bad ``keep_last``, ``keep_best``, ``monitor`` or ``mode``.
        CheckpointError: ``directory`` is missing and cannot be created (not writable).
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        keep_last: int | None = None,
        keep_best: int | None = None,
        monitor: str = "val_loss",
        mode: str | None = None,
        async_save: bool = False,
        run_config: dict[str, Any] | None = None,
    ) -> None:
        for name, value in (("keep_last", keep_last), ("keep_best", keep_best)):
            if value is not None and (not is_integer(value) or value < 1):
                raise ValueError(f"{name} must be None (keep all) or an integer >= 1, not {value!r}")
        if not isinstance(monitor, str) or not monitor:
            raise ValueError(f"monitor must be a metric name such as 'val_loss', not {monitor!r}")
        self.keep_last, self.keep_best, self.monitor = keep_last, keep_best, monitor
        self.mode = resolve_mode(monitor, mode)
        self.directory = Path(directory)
        with _writable(self.directory):
            self.directory.mkdir(parents=True, exist_ok=True)
        self.async_save = async_save
        self.run_config = dict(run_config or {})
        self._lock = FileLock(self.directory / LOCK_FILE, timeout=0)
        self._executor: ThreadPoolExecutor | None = None
        self._pending: Future[None] | None = None
        self._costs: list[WriteCost] = []  # written since the last take_costs()
        self._costs_lock = threading.Lock()

    # -- writing ------------------------------------------------------------------------------

    def _take_lock(self) -> None:
        if self._lock.is_locked:
            return
        try:
            with _writable(self.directory):
                self._lock.acquire()
        except Timeout:
            raise CheckpointError(
                f"{self.directory}: another process is writing checkpoints here (lock {self._lock.lock_file}); "
                "use another directory or stop that process"
            ) from None
        with _writable(self.directory):
            remove_strays(self.directory)

    def path_for(self, step: int) -> Path:
        """Where the checkpoint of ``step`` lives."""
        return self.directory / checkpoint_name(step)

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
            ValueError: a bad step, or an adapter of ``model`` is merged (nothing is written).
            CheckpointError: the step has a checkpoint already, another process holds the
                directory, the directory is not writable, or the write failed (previous
                checkpoints are untouched).
        """
        self._finish_pending()
        if not is_integer(step) or step < 0:
            raise ValueError(f"step must be an integer >= 0, not {step!r}")
        refuse_merged(model)
        self._take_lock()
        path = self.path_for(step)
        if path.exists():
            raise CheckpointError(f"{path}: a checkpoint of step {step} exists already; delete it first")
        start = time.perf_counter()
        snapshot = capture(step, model, optimizer, metrics, stage, extra, full, self.run_config, copy=self.async_save)
        if not self.async_save:
            self._write(snapshot, path, start)
            return path
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint")
        self._pending = self._executor.submit(self._write, snapshot, path, start)
        return path

    def _write(self, snapshot: Snapshot, path: Path, start: float) -> None:
        """Write ``snapshot`` as the checkpoint ``path``, remember it as verified and what it cost, then prune."""
        try:
            with _writable(self.directory):
                write_directory(path, snapshot.write)
        except (OSError, SafetensorError) as error:  # safetensors reports a failed write as its own error
            raise CheckpointError(f"{path}: could not be written ({error}); earlier checkpoints are intact") from error
        seconds, signature = time.perf_counter() - start, _signature(path)
        _remember(path, signature, _summary(snapshot.progress))
        with self._costs_lock:
            self._costs.append(WriteCost(snapshot.progress["step"], seconds, sum(size for _, size, _ in signature)))
        self._prune()

    def take_costs(self) -> list[WriteCost]:
        """The ``WriteCost`` of each checkpoint written (on disk) since the last call, oldest first."""
        with self._costs_lock:
            costs, self._costs = self._costs, []
        return costs

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
        """Delete one checkpoint of this directory (staged and damaged ones too: this is explicit).

        Raises:
            CheckpointError: not a checkpoint of this directory, no such checkpoint, another
                process holds the directory, or the directory is not writable.
        """
        self._finish_pending()
        self._take_lock()
        path = self._resolve(path_or_step)
        if path.parent.resolve() != self.directory.resolve() or step_of(path.name) is None:
            raise CheckpointError(f"{path}: not a checkpoint of {self.directory}")
        if not path.is_dir():
            raise CheckpointError(f"{path}: no such checkpoint")
        with _writable(self.directory):
            remove_directory(path)
        _forget(path)

    def _prune(self) -> None:
        """Delete the valid checkpoints that retention does not keep (see the class docstring)."""
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
                _forget(record["path"])

    def _set_aside(self, path: Path) -> Path:
        """Move the damaged checkpoint ``path`` to a hidden name beside it, atomically; returns where."""
        self._take_lock()
        with _writable(self.directory):
            aside = set_aside(path, CORRUPT_PREFIX)
        _forget(path)
        return aside

    # -- reading ------------------------------------------------------------------------------

    def _step_directories(self) -> list[Path]:
        """The entries named as checkpoints (``checkpoint_name(step)``), oldest first, whatever state they are in."""
        steps = {path: step_of(path.name) for path in self.directory.iterdir()}
        return sorted((path for path, step in steps.items() if step is not None), key=steps.__getitem__)

    def _records(self) -> list[dict[str, Any]]:
        """The valid checkpoints' summaries, oldest first: step, path, stage, size, created, metrics."""
        records = []
        for path in self._step_directories():
            checked = _checked(path)
            if checked is not None:
                summary, size = checked
                records.append({"step": summary["step"], "path": path, "stage": summary["stage"], "size": size,
                                "created": summary["created"], **summary["metrics"]})
        return records

    @staticmethod
    def _ranked(records: list[dict[str, Any]], metric: str, mode: str) -> list[dict[str, Any]]:
        """``records`` from best to worst by ``metric`` (``wb.selection.ranked``); those without a number left out."""
        order = ranked(((index, record.get(metric)) for index, record in enumerate(records)), mode)
        return [records[index] for index in order]

    def list(self) -> pd.DataFrame:
        """One row per valid checkpoint, oldest first: step, path, stage, size (bytes), created, metrics.

        A checkpoint that fails verification is left out, with a warning naming it and why.
        """
        columns = ["step", "path", "stage", "size", "created"]
        records = self._records()
        frame = pd.DataFrame(records, columns=list(dict.fromkeys([*columns, *(k for r in records for k in r)])))
        frame["path"] = frame["path"].astype(str)
        return frame

    def latest(self) -> Path | None:
        """The newest valid checkpoint's path, or None."""
        records = self._records()
        return records[-1]["path"] if records else None

    def best(self, metric: str | None = None, mode: str | None = None) -> Path | None:
        """The best valid checkpoint by ``metric`` (default ``monitor``), or None if none records it as a number.

        ``mode`` None is the manager's mode for its monitor, and for another metric the one
        ``wb.selection.metric_mode`` infers from its name (``best("val_acc")``: the highest).
        """
        metric = metric or self.monitor
        if mode is None and metric == self.monitor:
            mode = self.mode
        order = self._ranked(self._records(), metric, resolve_mode(metric, mode))
        return order[0]["path"] if order else None

    def _resolve(self, path_or_step: int | str | os.PathLike[str]) -> Path:
        if is_integer(path_or_step):
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
        """Load the newest checkpoint that passes verification, RNGs included, to continue exactly.

        A newer checkpoint that fails verification is moved aside (renamed to
        ``.corrupt-<name>-<8 hex>`` in the directory, kept for inspection; this takes the write
        lock, as ``save`` does), with a warning saying why and where it went; training can then
        save that step again. Returns the progress, or None when there is no valid checkpoint
        (start from scratch).

        Raises:
            CheckpointError: the chosen checkpoint does not fit the model, or a damaged one could
                not be moved aside (another process holds the directory, or it is not writable).
        """
        self._finish_pending()
        for path in reversed(self._step_directories()):
            try:
                progress = verify(path)
            except CheckpointError as error:
                aside = self._set_aside(path)
                warnings.warn(f"not resuming from {path.name}: {error}; moved it aside to {aside} (kept, not "
                              "deleted); trying an older one", stacklevel=2)
                continue
            return load_checkpoint(path, model, optimizer, restore_random=True, verified=progress)
        return None


@contextmanager
def _writable(directory: Path) -> Iterator[None]:
    """Turn a ``PermissionError`` inside the block into a ``CheckpointError`` saying ``directory`` is not writable."""
    try:
        yield
    except PermissionError as error:
        raise CheckpointError(f"{directory}: not writable ({error.strerror}: {error.filename}); give this "
                              "process write permission there or choose another directory") from error


# -- the process-wide cache of verifications ---------------------------------------------------


@dataclass(frozen=True)
class _Verdict:
    """What ``verify`` said of a checkpoint whose files had ``signature``: its summary, or None if it failed."""

    signature: Signature
    summary: dict[str, Any] | None


_verdicts: dict[Path, _Verdict] = {}  # by the checkpoint's resolved path: the verdict on its latest signature
_verdicts_lock = threading.Lock()


def _signature(path: Path) -> Signature:
    """Every file of ``path`` as (name, size, mtime_ns): any change to a file changes it.

    For a file where a directory should be, that file's own (name, size, mtime_ns).
    """
    try:
        stats = [(entry.name, entry.stat(follow_symlinks=False)) for entry in os.scandir(path)]
    except NotADirectoryError:
        stats = [(path.name, path.stat())]
    return tuple(sorted((name, stat.st_size, stat.st_mtime_ns) for name, stat in stats))


def _summary(progress: dict[str, Any]) -> dict[str, Any]:
    """What listing needs of a checkpoint's progress: step, stage, created, metrics."""
    return {key: progress[key] for key in ("step", "stage", "created", "metrics")}


def _remember(path: Path, signature: Signature, summary: dict[str, Any] | None) -> None:
    """Record the verdict on ``path`` with the files of ``signature`` (``summary`` None: it failed)."""
    with _verdicts_lock:
        _verdicts[path.resolve()] = _Verdict(signature, summary)


def _forget(path: Path) -> None:
    """Drop the verdict on ``path``, a checkpoint this process has just deleted or moved."""
    with _verdicts_lock:
        _verdicts.pop(path.resolve(), None)


def _checked(path: Path) -> tuple[dict[str, Any], int] | None:
    """(summary, size in bytes) of the checkpoint ``path`` if it passes ``verify``, else None.

    Hashes only when the files changed since the last verdict (or there was none). A failure
    is warned about when it is found, once per path and signature; a checkpoint that vanished
    meanwhile (deleted by its writer) is left out silently.
    """
    try:
        signature = _signature(path)
    except FileNotFoundError:
        return None
    with _verdicts_lock:
        verdict = _verdicts.get(path.resolve())
    if verdict is None or verdict.signature != signature:
        try:
            verdict = _Verdict(signature, _summary(verify(path)))
        except (CheckpointError, OSError) as error:
            if not path.exists():
                return None
            verdict = _Verdict(signature, None)
            warnings.warn(f"{path.name} is left out of the checkpoints of {path.parent}, it fails verification: "
                          f"{error}", stacklevel=4)
        try:
            unchanged = _signature(path) == signature
        except OSError:
            unchanged = False
        if unchanged:  # else a file changed while it was checked: the next call checks again
            _remember(path, signature, verdict.summary)
    if verdict.summary is None:
        return None
    return verdict.summary, sum(size for _, size, _ in signature)
