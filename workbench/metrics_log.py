"""The metrics log of a run, ``metrics.jsonl``: its one writer and its one reader.

One JSON object per line and per logged value::

    {"step": 50, "split": "val", "metric": "loss", "value": 0.3125, "time": 1764625800.123}

``split`` is "train" (the training loss of every step) or "val" (every evaluation); ``metric``
is the name without the split ("loss", "acc"); ``time`` is seconds since the epoch. A value
that is not a finite number is written as ``null`` (strict JSON has no NaN). Lines are only
appended; a crash can cut the last one short, which every reader leaves out.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TypedDict

from .checkpoints.files import write_text

COLUMNS = ("step", "split", "metric", "value", "time")


class Entry(TypedDict):
    """One line of the log."""

    step: int
    split: str
    metric: str
    value: float | None
    time: float


def entries(step: int, split: str, metrics: Mapping[str, float]) -> list[Entry]:
    """The log entries of one evaluation (or one training step): ``{"val_loss": 0.3}`` -> metric "loss"."""
    now = round(time.time(), 3)
    return [Entry(step=step, split=split, metric=name.removeprefix(f"{split}_"),
                  value=float(value) if math.isfinite(value) else None, time=now)
            for name, value in metrics.items()]


def _line(entry: Entry) -> str:
    return json.dumps(entry, allow_nan=False)


def append(path: str | os.PathLike[str], new: Iterable[Entry]) -> None:
    """Append entries to the log (created if missing), flushed to the OS in one write."""
    lines = [_line(entry) for entry in new]
    if lines:
        with open(path, "a") as file:
            file.write("\n".join(lines) + "\n")


def read(path: str | os.PathLike[str]) -> list[Entry]:
    """Every entry of the log, oldest first; [] when there is no log.

    A last line cut short by a crash is left out; a malformed line before it is corruption.

    Raises:
        ValueError: a line other than the last is not a log entry, naming the file and line.
    """
    path = Path(path)
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    result: list[Entry] = []
    for number, line in enumerate(lines, 1):
        try:
            entry = json.loads(line)
            if not (isinstance(entry, dict) and isinstance(entry.get("step"), int) and set(COLUMNS) <= set(entry)):
                raise ValueError(line)
        except ValueError:
            if number == len(lines):
                break  # cut short by a crash while it was written
            raise ValueError(f"{path}: line {number} is not a metrics entry ({', '.join(COLUMNS)})") from None
        result.append(entry)
    return result


def truncate(path: str | os.PathLike[str], step: int) -> None:
    """Keep only the entries up to ``step`` (atomically): a resumed run logs the later steps again."""
    path = Path(path)
    if path.exists():
        write_text(path, "".join(_line(entry) + "\n" for entry in read(path) if entry["step"] <= step))
