"""The variants' published claims, checked on the user's runs with intervals over paired seeds.

Every claim compares two configurations (``workbench.stats``: task, variant, rank, lr, options)
run with the same seeds, so each seed gives one paired difference or ratio, the effect; its mean
and 95% t interval over the seeds decide the verdict against the claim's threshold:

- "holds": the whole interval is on the claimed side of the threshold;
- "does not hold": the whole interval is on the other side (the threshold included);
- "inconclusive": the interval spans the threshold, or one seed gave no interval at all;
- "not measured": the runs the claim needs are not there.

Where a variant ran at several learning rates, the one with the best mean validation value is
compared (choosing on validation, as everything else here does). A run's values are those of its
best checkpoint by its monitor (``load_runs``: best_value, val_loss, val_acc, ...); "steps to reach
a value" reads every evaluation in the metrics log.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pandas as pd

from .selection import metric_mode
from .stats import interval, main_monitor, paired, runs_of, summarize

HOLDS, FAILS, INCONCLUSIVE, UNMEASURED = "holds", "does not hold", "inconclusive", "not measured"
VERDICTS = (HOLDS, FAILS, INCONCLUSIVE, UNMEASURED)
COLUMNS = ["claim", "source", "task", "rank", "measurement", "effect", "ci_low", "ci_high", "n", "threshold",
           "verdict"]
VERA_MIN_RATIO = 10.0  # LoRA's trainable parameters over VeRA's, at least
SMALL_ACCURACY_COST = 0.05  # validation accuracy a variant may lose against LoRA, absolute
MATCH_MARGIN = 0.01  # a variant that "matches" LoRA may have a validation value worse by this fraction of LoRA's


def verdict(low: float, high: float, n: int, threshold: float, better: str) -> str:
    """The verdict of an effect whose 95% interval over ``n`` seeds is [low, high].

    ``better`` is "below" (the claim is that the effect is under ``threshold``) or "above".
    """
    if n == 0:
        return UNMEASURED
    if n < 2 or math.isnan(low) or math.isnan(high):
        return INCONCLUSIVE
    claimed, against = (high < threshold, low >= threshold) if better == "below" else (low > threshold,
                                                                                     high <= threshold)
    return HOLDS if claimed else FAILS if against else INCONCLUSIVE


@dataclass(frozen=True)
class Claim:
    """One published claim: what it says, where, and how it is measured here."""

    claim: str
    source: str
    measurement: str
    threshold: float
    better: str  # "below" or "above"

    def row(self, task: Any = None, rank: Any = None, effects: pd.Series | None = None) -> dict[str, Any]:
        """The claim's table row for one task and rank from the per-seed ``effects`` (None: not measured)."""
        values = pd.Series(dtype=float) if effects is None else pd.to_numeric(effects, errors="coerce").dropna()
        mean, _, low, high = interval(values.to_numpy())
        n = len(values)
        return {"claim": self.claim, "source": self.source, "task": task, "rank": rank,
                "measurement": self.measurement, "effect": mean, "ci_low": low, "ci_high": high, "n": n,
                "threshold": self.threshold, "verdict": verdict(low, high, n, self.threshold, self.better)}


def _best_configuration(summary: pd.DataFrame, task: Any, variant: str, rank: Any,
                        options: str = "") -> pd.Series | None:
    """The configuration of ``variant`` at ``task`` and ``rank`` with the best mean validation value (its lr)."""
    rows = summary[(summary["task"] == task) & (summary["variant"] == variant) & (summary["options"] == options)
                   & (summary["n"] > 0)]
    rows = rows[rows["rank"].isna()] if rank is None or pd.isna(rank) else rows[rows["rank"] == rank]
    return None if rows.empty else rows.iloc[0]  # summarize sorts best first


def _pairs(summary: pd.DataFrame, first: tuple[str, str], second: tuple[str, str],
           rank_free_second: bool = False) -> Iterator[tuple[Any, Any, pd.Series, pd.Series]]:
    """(task, rank, first's configuration, second's) wherever both (variant, options) ran; ``second`` without a
    rank (a baseline) when ``rank_free_second``."""
    ran = summary[(summary["variant"] == first[0]) & (summary["options"] == first[1]) & (summary["n"] > 0)]
    for (task, rank), _ in ran.groupby(["task", "rank"], sort=True):
        one = _best_configuration(summary, task, first[0], rank, first[1])
        two = _best_configuration(summary, task, second[0], None if rank_free_second else rank, second[1])
        if one is not None and two is not None:
            yield task, int(rank), one, two


def _shortfall(mode: str) -> Callable[[pd.Series, pd.Series], pd.Series]:
    """How much worse ``theirs`` is than ``ours`` relative to ours (positive: worse), for a metric's mode."""
    sign = 1.0 if mode == "min" else -1.0
    return lambda ours, theirs: sign * (theirs - ours) / ours.abs()


def _steps_to(metrics: pd.DataFrame, run: str, metric: str, target: float, mode: str) -> float:
    """The first evaluation step at which ``run``'s validation ``metric`` is as good as ``target``; NaN: never."""
    rows = metrics[(metrics["run"] == run) & (metrics["split"] == "val") & (metrics["metric"] == metric)]
    hits = rows[rows["value"] <= target] if mode == "min" else rows[rows["value"] >= target]
    return float(hits["step"].min()) if len(hits) else math.nan


def _speed(claim: Claim, runs: pd.DataFrame, metrics: pd.DataFrame, summary: pd.DataFrame,
           faster: tuple[str, str], reference: tuple[str, str]) -> list[dict[str, Any]]:
    """Steps ``faster`` needs to reach the reference's best validation value, over the reference's steps, per seed.

    A run that never gets there counts as its steps done: a lower bound on the steps it needs,
    so the ratio can only err in the claim's favour, and then only for a run that never got there.
    """
    rows = []
    for task, rank, ours, theirs in _pairs(summary, reference, faster):
        monitor = str(ours["monitor"])
        metric, mode = monitor.removeprefix("val_"), metric_mode(monitor)
        ratios = []
        for reference_run, faster_run in _paired_runs(runs, ours, theirs):
            target = float(reference_run["best_value"])
            reference_steps = _steps_to(metrics, reference_run["run"], metric, target, mode)
            steps = _steps_to(metrics, faster_run["run"], metric, target, mode)
            if math.isnan(steps):
                steps = float(faster_run["steps_done"])
            ratios.append(steps / reference_steps if reference_steps else math.nan)
        rows.append(claim.row(task, rank, pd.Series(ratios, dtype=float)))
    return rows or [claim.row()]


def _paired_runs(runs: pd.DataFrame, one: pd.Series, two: pd.Series) -> Iterator[tuple[pd.Series, pd.Series]]:
    """(first's run row, second's run row) for each seed both configurations ran with a best checkpoint, by seed."""
    first, second = (runs_of(runs, config).dropna(subset=["best_value"]).drop_duplicates("seed").set_index("seed")
                     for config in (one, two))
    for seed in sorted(set(first.index) & set(second.index)):
        yield first.loc[seed], second.loc[seed]


LORA, DEFAULT = "lora", ""

LORA_PLUS = Claim(
    "LoRA+ reaches LoRA's best validation value in fewer steps", "Hayou et al., 2024 (LoRA+)",
    "per seed: the first evaluation step at which LoRA+ is at least as good as that seed's LoRA run at its best "
    "checkpoint, over the step LoRA got there (never: its last step, a lower bound); holds if the ratio is < 1",
    1.0, "below")
VERA_PARAMETERS = Claim(
    "VeRA trains at least 10x fewer parameters than LoRA", "Kopiczko et al., 2024 (VeRA)",
    "LoRA's trainable parameters over VeRA's at the same rank; holds if >= 10", VERA_MIN_RATIO, "above")
VERA_COST = Claim(
    "... for a small cost in accuracy", "Kopiczko et al., 2024 (VeRA)",
    f"per seed: LoRA's validation accuracy minus VeRA's (best checkpoints); holds if below {SMALL_ACCURACY_COST:g}",
    SMALL_ACCURACY_COST, "below")
LORA_FA_MEMORY = Claim(
    "LoRA-FA keeps less activation memory than LoRA", "Zhang et al., 2023 (LoRA-FA)",
    "per seed: bytes autograd saves for backward on one training batch, LoRA-FA's over LoRA's; holds if < 1",
    1.0, "below")
LORA_FA_COST = Claim(
    "... at a small cost in accuracy", "Zhang et al., 2023 (LoRA-FA)",
    f"per seed: LoRA's validation accuracy minus LoRA-FA's; holds if below {SMALL_ACCURACY_COST:g}",
    SMALL_ACCURACY_COST, "below")
DELTA_LORA = Claim(
    "Delta-LoRA matches or beats LoRA", "Zi et al., 2023 (Delta-LoRA)",
    f"per seed: how much worse Delta-LoRA's best validation value is than LoRA's, as a fraction of LoRA's; "
    f"holds if below {MATCH_MARGIN:g} (a margin for 'matches')", MATCH_MARGIN, "below")
DORA = Claim(
    "DoRA matches or beats LoRA, especially at low rank", "Liu et al., 2024 (DoRA)",
    f"per seed and rank: how much worse DoRA's best validation value is than LoRA's, as a fraction of LoRA's; "
    f"holds if below {MATCH_MARGIN:g} (a margin for 'matches'); the rows by rank show where it gains most",
    MATCH_MARGIN, "below")
RSLORA = Claim(
    "rsLoRA keeps improving with rank where LoRA saturates", "Kalajdzievski, 2023 (rsLoRA)",
    "per seed: the improvement of the best validation value from the lowest to the highest rank run, rsLoRA's "
    "minus LoRA's (positive: rsLoRA gains more); holds if > 0; needs both at two ranks or more (e.g. 8 and 64)",
    0.0, "above")
PISSA = Claim(
    "PiSSA converges faster than LoRA's default initialisation", "Meng et al., 2024 (PiSSA)",
    "per seed: the first step at which LoRA with init=pissa is at least as good as default-init LoRA at its "
    "best checkpoint, over the step default LoRA got there; holds if the ratio is < 1", 1.0, "below")
FORGETTING = Claim(
    "LoRA forgets less than full fine-tuning", "Biderman et al., 2024 (LoRA Learns Less and Forgets Less)",
    "per seed: LoRA's loss on the forget split (text never trained on) minus full fine-tuning's, both at their "
    "best checkpoints; holds if < 0", 0.0, "below")


def _paired(claim: Claim, runs: pd.DataFrame, summary: pd.DataFrame, variant: str, column: str,
            effect: Callable[[pd.Series, pd.Series], pd.Series], rank_free: bool = False) -> list[dict[str, Any]]:
    """The claim at each task and rank where LoRA and ``variant`` ran: ``effect(LoRA's column, variant's)`` per
    shared seed; ``rank_free``: ``variant`` is a baseline, compared with LoRA at every rank."""
    if column not in runs:
        return [claim.row()]
    rows = []
    for task, rank, ours, theirs in _pairs(summary, (LORA, DEFAULT), (variant, DEFAULT), rank_free):
        table = paired(runs, ours, theirs, column)
        rows.append(claim.row(task, rank, effect(table["first"], table["second"])))
    return rows or [claim.row()]


def _difference(lora: pd.Series, other: pd.Series) -> pd.Series:
    return lora - other


def _rslora(runs: pd.DataFrame, summary: pd.DataFrame) -> list[dict[str, Any]]:
    rows = []
    for task in sorted(set(summary["task"])):
        ranks = {}
        for options in (DEFAULT, "rslora=True"):
            ran = summary[(summary["task"] == task) & (summary["variant"] == LORA) & (summary["options"] == options)
                          & (summary["n"] > 0)]
            ranks[options] = set(ran["rank"].dropna().astype(int))
        common = sorted(ranks[DEFAULT] & ranks["rslora=True"])
        if len(common) < 2:
            continue
        low, high = common[0], common[-1]
        gains = {}
        for options in (DEFAULT, "rslora=True"):
            at_low = _best_configuration(summary, task, LORA, low, options)
            at_high = _best_configuration(summary, task, LORA, high, options)
            sign = 1.0 if metric_mode(str(at_low["monitor"])) == "min" else -1.0
            table = paired(runs, at_low, at_high, "best_value")
            gains[options] = pd.Series(sign * (table["first"] - table["second"]).to_numpy(), index=table["seed"])
        effect = (gains["rslora=True"] - gains[DEFAULT]).dropna()
        rows.append(RSLORA.row(task, f"{low} to {high}", effect))
    return rows or [RSLORA.row()]


def check_claims(runs: pd.DataFrame | str | os.PathLike[str], metrics: pd.DataFrame | None = None) -> pd.DataFrame:
    """Each published claim checked on a runs directory (or on ``load_runs`` and ``load_metrics`` tables).

    One row per claim and task and rank where it could be measured (one "not measured" row where
    it could not): claim, source, task, rank, measurement (what is compared, and the threshold),
    effect (mean over paired seeds), ci_low, ci_high (its 95% interval), n (seeds), threshold, and
    verdict (``VERDICTS``; see the module's doc). A claim measured with one seed is never decided.
    """
    if not isinstance(runs, pd.DataFrame):
        from .runs import load_metrics, load_runs

        runs, metrics = load_runs(runs), load_metrics(runs)
    if metrics is None:
        raise ValueError("check_claims needs the metrics table with a runs table: check_claims(runs, metrics), "
                         "or give the runs directory: check_claims('runs')")
    if runs.empty:
        return pd.DataFrame([claim.row() for claim in CLAIMS], columns=COLUMNS)
    monitor = main_monitor(runs)
    runs = runs[runs["monitor"] == monitor]
    summary = summarize(runs)
    rows = [
        *_speed(LORA_PLUS, runs, metrics, summary, ("lora-plus", DEFAULT), (LORA, DEFAULT)),
        *_paired(VERA_PARAMETERS, runs, summary, "vera", "trainable", lambda lora, vera: lora / vera),
        *_paired(VERA_COST, runs, summary, "vera", "val_acc", _difference),
        *_paired(LORA_FA_MEMORY, runs, summary, "lora-fa", "saved_bytes", lambda lora, fa: fa / lora),
        *_paired(LORA_FA_COST, runs, summary, "lora-fa", "val_acc", _difference),
        *_paired(DELTA_LORA, runs, summary, "delta-lora", "best_value", _shortfall(metric_mode(monitor))),
        *_paired(DORA, runs, summary, "dora", "best_value", _shortfall(metric_mode(monitor))),
        *_rslora(runs, summary),
        *_speed(PISSA, runs, metrics, summary, (LORA, "init=pissa"), (LORA, DEFAULT)),
        *_paired(FORGETTING, runs, summary, "full", "forget_loss", _difference, rank_free=True),
    ]
    table = pd.DataFrame(rows, columns=COLUMNS)
    table["rank"] = pd.Series([row["rank"] for row in rows], dtype=object)  # ranks stay integers ("8 to 64" a text)
    return table


CLAIMS = (LORA_PLUS, VERA_PARAMETERS, VERA_COST, LORA_FA_MEMORY, LORA_FA_COST, DELTA_LORA, DORA, RSLORA, PISSA,
          FORGETTING)
