"""Which value is best: the one rule for a metric's direction and the best of a series.

Every choice of "the best" (the checkpoint manager's ``best()`` and ``keep_best``, the runs
table's best checkpoint, ``wb.best_checkpoint``, the report, the figures, the panels and the
CLI) calls these functions, so they cannot disagree:

- a metric's mode is given (``"min"``: lower is better, ``"max"``: higher is better) or
  inferred from its name: accuracies (``val_acc``, ``test_accuracy``, ...) are ``"max"``,
  losses and anything else ``"min"``;
- values that are not finite numbers (NaN, None, text) never win; ties go to the first.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable
from typing import Any

import pandas as pd

MODES: tuple[str, ...] = ("min", "max")
HIGHER_IS_BETTER: tuple[str, ...] = ("acc", "accuracy")  # metric names ending in these are "max"


def metric_mode(metric: str) -> str:
    """``"max"`` for an accuracy (a name ending in ``acc`` or ``accuracy``), ``"min"`` for a loss or anything else."""
    return "max" if str(metric).endswith(HIGHER_IS_BETTER) else "min"


def check_mode(mode: object) -> str:
    """``mode`` if it is ``"min"`` or ``"max"``.

    Raises:
        ValueError: any other value, naming the valid ones.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be 'min' (lower is better) or 'max' (higher is better), not {mode!r}")
    return str(mode)


def resolve_mode(metric: str, mode: str | None = None) -> str:
    """The mode given, checked, or (``None``) the one ``metric_mode`` infers from the metric's name."""
    return metric_mode(metric) if mode is None else check_mode(mode)


def direction(mode: str) -> str:
    """``"lowest"`` or ``"highest"``: the words for a mode, as tables and figures say it."""
    return "lowest" if check_mode(mode) == "min" else "highest"


def score(value: Any) -> float | None:
    """``value`` as a float if it is a finite number, else None (it cannot be ranked)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        try:
            value = float(value)
        except (TypeError, ValueError):
            return None
    value = float(value)
    return value if math.isfinite(value) else None


def best_index(values: pd.Series | Iterable[tuple[Hashable, Any]], mode: str) -> Hashable | None:
    """The label of the best value (``mode`` "min" or "max"); None when no value is a finite number.

    Args:
        values: a Series, or (label, value) pairs; NaN, None, infinities and non-numbers are skipped.
        mode: ``"min"`` or ``"max"``. On a tie the first label wins.
    """
    check_mode(mode)
    pairs = values.items() if isinstance(values, pd.Series) else values
    best_label, best_value = None, None
    for label, value in pairs:
        number = score(value)
        if number is None:
            continue
        if best_value is None or (number < best_value if mode == "min" else number > best_value):
            best_label, best_value = label, number
    return best_label


def ranked(values: Iterable[tuple[Hashable, Any]], mode: str) -> list[Hashable]:
    """Labels from best to worst by their values (``mode`` "min" or "max"); unscorable values left out, stable."""
    check_mode(mode)
    scored = [(label, number) for label, value in values if (number := score(value)) is not None]
    scored.sort(key=lambda pair: pair[1], reverse=mode == "max")
    return [label for label, _ in scored]
