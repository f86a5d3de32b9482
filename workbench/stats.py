"""Statistics over runs: confidence intervals over seeds, one row per configuration, Pareto fronts.

A configuration is what a run was asked for apart from its seed: task, variant, rank, learning
rate and the variant's options that differ from their defaults. Runs of one configuration with
different seeds are repeated measurements of it; runs of two configurations that share a seed
share the data order and the new head's initialisation, so they are compared pairwise
(``paired``). Intervals are Student's t intervals from scipy: for n values with mean m and sample
standard deviation s, m +- t_{0.975, n-1} s / sqrt(n). One value has no interval (NaN bounds).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from .adapters import variant_names, variant_options
from .selection import check_mode, metric_mode

CONFIDENCE = 0.95
CONFIG_COLUMNS = ["task", "variant", "rank", "lr", "options"]
# per-run figures averaged over a configuration's seeds (None when a run did not record one)
COST_COLUMNS = ["trainable", "saved_bytes", "peak_rss", "wall_time"]


def interval(values: Sequence[float] | np.ndarray, confidence: float = CONFIDENCE) -> tuple[float, float, float, float]:
    """(mean, sample standard deviation, low, high) of ``values``: Student's t interval of the mean.

    NaN values are left out. Fewer than two values: the standard deviation and the bounds are NaN
    (one measurement says nothing of its noise); no value: all four are NaN.
    """
    data = np.asarray(values, dtype=float)
    data = data[~np.isnan(data)]
    if data.size == 0:
        return math.nan, math.nan, math.nan, math.nan
    mean = float(data.mean())
    if data.size < 2:
        return mean, math.nan, math.nan, math.nan
    std = float(data.std(ddof=1))
    if std == 0.0:
        return mean, 0.0, mean, mean
    from scipy import stats  # on first use: importing scipy.stats costs ``import workbench`` 0.8 s

    low, high = stats.t.interval(confidence, data.size - 1, loc=mean, scale=std / math.sqrt(data.size))
    return mean, std, float(low), float(high)


def main_monitor(runs: pd.DataFrame) -> str:
    """The validation metric most runs monitor (ties: the first by name); runs are compared on it."""
    return str(runs["monitor"].value_counts().sort_index(kind="stable").idxmax())


def test_metric(monitor: str) -> str:
    """The test split's counterpart of a validation monitor: ``val_acc`` -> ``test_acc``."""
    return "test_" + monitor.removeprefix("val_")


def options_label(variant: str, options: dict[str, Any] | None) -> str:
    """The options that differ from the variant's defaults, as ``"init=pissa, rslora=True"`` ("" for none)."""
    if not options or variant not in variant_names():
        return ""
    defaults = {name: option.default for name, option in variant_options(variant).items()}
    return ", ".join(f"{name}={value}" for name, value in sorted(options.items())
                     if name not in defaults or defaults[name] != value)


def summarize(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per configuration (task, variant, rank, lr, options) of a runs table (``load_runs``'s).

    Columns: the configuration; monitor (the validation metric runs are selected on); n (runs
    with a best checkpoint); best_mean, best_std, best_low, best_high (the best validation value
    of each run: mean, standard deviation and 95% interval over seeds); test_metric (the test
    counterpart of the monitor) and test_mean, test_std, test_low, test_high; trainable,
    saved_bytes, peak_rss (bytes) and wall_time (seconds), each the mean over the runs; diverged
    (how many of the runs diverged) and runs (their names). Rows are sorted by best_mean, best
    first by the monitor's mode; configurations with no measured run come last.

    Raises:
        ValueError: the runs monitor more than one metric (their best values do not compare).
    """
    columns = [*CONFIG_COLUMNS, "monitor", "n", "best_mean", "best_std", "best_low", "best_high", "test_metric",
               "test_mean", "test_std", "test_low", "test_high", *COST_COLUMNS, "diverged", "runs"]
    if runs.empty:
        return pd.DataFrame(columns=columns)
    monitors = sorted(set(runs["monitor"]))
    if len(monitors) > 1:
        raise ValueError(f"the runs monitor {', '.join(monitors)}; summarize runs of one monitor at a time "
                         "(select them by the monitor column)")
    monitor = monitors[0]
    test = test_metric(monitor)
    table = runs.assign(options=runs["options"] if "options" in runs else "")
    rows = []
    for key, group in table.groupby(CONFIG_COLUMNS, sort=True, dropna=False):
        best = pd.to_numeric(group["best_value"], errors="coerce")
        tested = pd.to_numeric(group[test], errors="coerce") if test in group else pd.Series(np.nan, group.index)
        row: dict[str, Any] = dict(zip(CONFIG_COLUMNS, key, strict=True))
        row.update(monitor=monitor, n=int(best.notna().sum()))
        row.update(zip(("best_mean", "best_std", "best_low", "best_high"), interval(best), strict=True))
        row["test_metric"] = test
        row.update(zip(("test_mean", "test_std", "test_low", "test_high"), interval(tested), strict=True))
        for column in COST_COLUMNS:
            values = pd.to_numeric(group[column], errors="coerce") if column in group else pd.Series(dtype=float)
            row[column] = float(values.mean()) if values.notna().any() else math.nan
        row["diverged"] = int((group["status"] == "diverged").sum())
        row["runs"] = ", ".join(group["run"])
        rows.append(row)
    summary = pd.DataFrame(rows, columns=columns)
    summary["rank"] = summary["rank"].astype("Int64")  # baselines have no rank
    ascending = metric_mode(monitor) == "min"
    return summary.sort_values("best_mean", ascending=ascending, na_position="last", kind="stable",
                               ignore_index=True)


def runs_of(runs: pd.DataFrame, config: pd.Series | dict[str, Any]) -> pd.DataFrame:
    """The rows of ``runs`` of one configuration (its values of ``CONFIG_COLUMNS``: a ``summarize`` row)."""
    mask = pd.Series(True, index=runs.index)
    for name in CONFIG_COLUMNS:
        value = config[name]
        column = runs[name] if name in runs else pd.Series("", index=runs.index)
        mask &= column.isna() if pd.isna(value) else column == value
    return runs[mask]


def paired(runs: pd.DataFrame, first: pd.Series | dict[str, Any], second: pd.Series | dict[str, Any],
           column: str) -> pd.DataFrame:
    """``column`` of the runs of two configurations, matched by seed: seed, first, second (a row per shared seed).

    Seeds only one of them ran are left out.
    """
    one, two = (runs_of(runs, config)[["seed", column]].drop_duplicates("seed") for config in (first, second))
    merged = one.merge(two, on="seed", suffixes=("_first", "_second"))
    return pd.DataFrame({"seed": merged["seed"], "first": pd.to_numeric(merged[f"{column}_first"], errors="coerce"),
                         "second": pd.to_numeric(merged[f"{column}_second"], errors="coerce")})


def pareto_front(table: pd.DataFrame, cost: str, value: str, mode: str) -> pd.Series:
    """Which rows are on the Pareto front of low ``cost`` and good ``value`` (a boolean Series on ``table``'s index).

    A row is on the front when no other row is at least as good on both and strictly better on
    one; ``mode`` says which way ``value`` is good ("min" or "max"). Rows with a missing cost or
    value are never on it.
    """
    check_mode(mode)
    costs = pd.to_numeric(table[cost], errors="coerce")
    values = pd.to_numeric(table[value], errors="coerce")
    goodness = values if mode == "max" else -values
    known = costs.notna() & goodness.notna()
    front = pd.Series(False, index=table.index)
    for index in table.index[known]:
        others = known & (costs <= costs[index]) & (goodness >= goodness[index])
        others &= (costs < costs[index]) | (goodness > goodness[index])
        front[index] = not others.any()
    return front
