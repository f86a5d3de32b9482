"""The report of a runs directory: one standalone HTML file of figures, the runs table and the claims checked.

``write_report`` embeds plotly.js inline once, so the file opens anywhere with no network. Every
figure comes from ``workbench.plots``; every number from the run directories (``load_runs``,
``load_metrics``). The published claims are checked by plain functions of those two tables
(``check_claims``), usable and tested without any HTML.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from html import escape
from numbers import Integral, Real
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from .checkpoints.files import write_text
from .runs import load_checkpoints, load_metrics, load_runs
from .selection import best_index, direction, metric_mode

if TYPE_CHECKING:
    import plotly.graph_objects as go

HOLDS, FAILS, UNMEASURED = "holds", "does not hold", "not measured here"
VERA_MIN_RATIO = 10.0  # LoRA's trainable parameters over VeRA's, at least
VERA_MAX_ACC_DROP = 0.05  # validation accuracy VeRA may lose against LoRA, absolute
DELTA_LORA_TOLERANCE = 0.01  # Delta-LoRA's best validation loss may exceed LoRA's by this fraction

TABLE_COLUMNS = ["run", "variant", "rank", "alpha", "lr", "seed", "trainable", "saved_bytes", "steps_done", "steps",
                 "monitor", "best_value", "best_step", "test_loss", "test_acc", "wall_time", "status"]
FIGURE_HEIGHT = 460

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; padding: 0 1em; }
h1 { margin-bottom: 0.2em; } h2 { margin-top: 2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 0.9em; margin: 0.5em 0 1em; }
th, td { border: 1px solid #ddd; padding: 0.25em 0.6em; text-align: right; }
th { background: #f3f3f3; } td:first-child, th:first-child { text-align: left; }
tr.best td { background: #fff3b0; font-weight: bold; }
.verdict { font-weight: bold; padding: 0.1em 0.5em; border-radius: 0.3em; }
.holds { background: #d4f4d4; } .does-not-hold { background: #f8d4d4; } .not-measured-here { background: #e8e8e8; }
.note { color: #555; }
"""


# -- the claims -------------------------------------------------------------------------------


def _validation(metrics: pd.DataFrame, metric: str) -> pd.DataFrame:
    """The logged validation values of ``metric`` ("loss", "acc"): run, step, value."""
    rows = metrics[(metrics["split"] == "val") & (metrics["metric"] == metric)]
    return rows[["run", "step", "value"]].astype({"value": float})


def _best(values: pd.DataFrame, runs: Sequence[str], mode: str) -> float | None:
    """The best value any of ``runs`` logged (lowest for mode "min"), or None if they logged none."""
    mine = values.loc[values["run"].isin(runs), "value"]
    best = best_index(mine, mode)
    return None if best is None else float(mine[best])


def _first_step(values: pd.DataFrame, runs: Sequence[str], target: float) -> int | None:
    """The first logged step at which any of ``runs`` has a value <= ``target``, or None if never."""
    hits = values[values["run"].isin(runs) & (values["value"] <= target)]
    return None if hits.empty else int(hits["step"].min())


def _median(runs: pd.DataFrame, names: Sequence[str], column: str) -> float | None:
    """The median of a per-run figure (one value for every learning rate and seed), or None if unrecorded."""
    values = pd.to_numeric(runs.loc[runs["run"].isin(names), column], errors="coerce").dropna()
    return None if values.empty else float(values.median())


def _pairs(runs: pd.DataFrame, baseline: str, variant: str) -> Iterator[tuple[str, int, list[str], list[str]]]:
    """(task, rank, baseline's runs, variant's runs) for every task and rank with runs of both variants."""
    for (task, rank), group in runs.groupby(["task", "rank"], sort=True):
        ours = group.loc[group["variant"] == baseline, "run"].tolist()
        theirs = group.loc[group["variant"] == variant, "run"].tolist()
        if ours and theirs:
            yield str(task), int(rank), ours, theirs


def _claim(claim: str, test: str, columns: list[str], rows: list[dict[str, Any]]) -> dict[str, Any]:
    """A claim's record; it holds if it holds at every rank measured, and is not measured if no rank is."""
    figures = pd.DataFrame(rows, columns=["task", "rank", *columns, "verdict"])
    measured = figures.loc[figures["verdict"] != UNMEASURED, "verdict"]
    verdict = UNMEASURED if measured.empty else HOLDS if (measured == HOLDS).all() else FAILS
    return {"claim": claim, "test": test, "figures": figures, "verdict": verdict}


def lora_plus_speed(runs: pd.DataFrame, metrics: pd.DataFrame) -> dict[str, Any]:
    """LoRA+ reaches LoRA's best validation loss in fewer steps, at each rank where both ran."""
    loss = _validation(metrics, "loss")
    rows = []
    for task, rank, lora, plus in _pairs(runs, "lora", "lora-plus"):
        target = _best(loss, lora, "min")
        lora_steps = None if target is None else _first_step(loss, lora, target)
        plus_steps = None if target is None else _first_step(loss, plus, target)
        verdict = (UNMEASURED if lora_steps is None else
                   HOLDS if plus_steps is not None and plus_steps < lora_steps else FAILS)
        rows.append({"task": task, "rank": rank, "LoRA best val loss L": target, "LoRA steps to L": lora_steps,
                     "LoRA+ steps to L": plus_steps, "verdict": verdict})
    return _claim(
        "LoRA+ reaches LoRA's validation loss in fewer steps (Hayou et al., 2024).",
        "At each rank: L is LoRA's best validation loss; the figure is the first logged step at which each "
        "variant's validation loss is <= L. Holds if LoRA+ gets there in fewer steps; the same number of "
        "steps, more, or never reaching L does not hold.",
        ["LoRA best val loss L", "LoRA steps to L", "LoRA+ steps to L"], rows)


def vera_parameters(runs: pd.DataFrame, metrics: pd.DataFrame) -> dict[str, Any]:
    """VeRA trains at least 10x fewer parameters than LoRA at the same rank, for a small accuracy cost."""
    accuracy = _validation(metrics, "acc")
    rows = []
    for task, rank, lora, vera in _pairs(runs, "lora", "vera"):
        lora_params, vera_params = _median(runs, lora, "trainable"), _median(runs, vera, "trainable")
        lora_acc, vera_acc = _best(accuracy, lora, "max"), _best(accuracy, vera, "max")
        ratio = lora_params / vera_params if lora_params is not None and vera_params else None
        drop = lora_acc - vera_acc if lora_acc is not None and vera_acc is not None else None
        verdict = (UNMEASURED if ratio is None or drop is None else
                   HOLDS if ratio >= VERA_MIN_RATIO and drop <= VERA_MAX_ACC_DROP else FAILS)
        rows.append({"task": task, "rank": rank, "LoRA trainable": lora_params, "VeRA trainable": vera_params,
                     "ratio": ratio, "LoRA best val acc": lora_acc, "VeRA best val acc": vera_acc,
                     "accuracy drop": drop, "verdict": verdict})
    return _claim(
        "VeRA trains at least 10x fewer parameters than LoRA at the same rank, for a small cost in accuracy "
        "(Kopiczko et al., 2024).",
        f"At each rank: LoRA's trainable parameters over VeRA's, and LoRA's best validation accuracy minus "
        f"VeRA's. Holds if the ratio is >= {VERA_MIN_RATIO:g} and the accuracy drop is <= {VERA_MAX_ACC_DROP:g} "
        "(absolute).",
        ["LoRA trainable", "VeRA trainable", "ratio", "LoRA best val acc", "VeRA best val acc", "accuracy drop"],
        rows)


def lora_fa_memory(runs: pd.DataFrame) -> dict[str, Any]:
    """LoRA-FA keeps less activation memory for backward than LoRA, at each rank where both ran."""
    rows = []
    for task, rank, lora, fa in _pairs(runs, "lora", "lora-fa"):
        lora_bytes, fa_bytes = _median(runs, lora, "saved_bytes"), _median(runs, fa, "saved_bytes")
        measured = lora_bytes is not None and fa_bytes is not None
        rows.append({"task": task, "rank": rank, "LoRA saved bytes": lora_bytes, "LoRA-FA saved bytes": fa_bytes,
                     "LoRA-FA / LoRA": fa_bytes / lora_bytes if measured and lora_bytes else None,
                     "verdict": UNMEASURED if not measured else HOLDS if fa_bytes < lora_bytes else FAILS})
    return _claim(
        "LoRA-FA keeps less activation memory than LoRA (Zhang et al., 2023).",
        "At each rank: the bytes autograd keeps for backward on one training batch (the runs' saved_bytes). "
        "Holds if LoRA-FA keeps fewer than LoRA.",
        ["LoRA saved bytes", "LoRA-FA saved bytes", "LoRA-FA / LoRA"], rows)


def delta_lora_loss(runs: pd.DataFrame, metrics: pd.DataFrame) -> dict[str, Any]:
    """Delta-LoRA's best validation loss matches or beats LoRA's, at each rank where both ran."""
    loss = _validation(metrics, "loss")
    rows = []
    for task, rank, lora, delta in _pairs(runs, "lora", "delta-lora"):
        lora_loss, delta_loss = _best(loss, lora, "min"), _best(loss, delta, "min")
        measured = lora_loss is not None and delta_loss is not None
        rows.append({"task": task, "rank": rank, "LoRA best val loss": lora_loss,
                     "Delta-LoRA best val loss": delta_loss,
                     "Delta-LoRA / LoRA": delta_loss / lora_loss if measured and lora_loss else None,
                     "verdict": UNMEASURED if not measured else
                     HOLDS if delta_loss <= lora_loss * (1 + DELTA_LORA_TOLERANCE) else FAILS})
    return _claim(
        "Delta-LoRA matches or beats LoRA (Zi et al., 2023).",
        f"At each rank: the best validation loss of each. Holds if Delta-LoRA's is at most LoRA's plus "
        f"{DELTA_LORA_TOLERANCE:.0%} of it (a tolerance for noise).",
        ["LoRA best val loss", "Delta-LoRA best val loss", "Delta-LoRA / LoRA"], rows)


def check_claims(runs: pd.DataFrame, metrics: pd.DataFrame) -> list[dict[str, Any]]:
    """Each published claim checked on these runs: dicts of claim, test, figures (a table per rank), verdict.

    A verdict is "holds" when the claim holds at every task and rank where the runs it needs
    exist, "does not hold" when it fails at one of them, and "not measured here" when there are
    none. With several runs of a variant at a rank (learning rates, seeds) the best of them counts.

    Args:
        runs: ``load_runs``' table (run, task, variant, rank, trainable, saved_bytes, ...).
        metrics: ``load_metrics``' table (run, step, split, metric, value).
    """
    return [lora_plus_speed(runs, metrics), vera_parameters(runs, metrics), lora_fa_memory(runs),
            delta_lora_loss(runs, metrics)]


# -- the runs table ---------------------------------------------------------------------------


def main_monitor(runs: pd.DataFrame) -> str:
    """The metric most runs monitor (ties: the first by name); the report compares runs on it."""
    return str(runs["monitor"].value_counts().sort_index(kind="stable").idxmax())


def best_run(runs: pd.DataFrame, monitor: str) -> str | None:
    """The run with the best ``best_value`` among the runs monitoring ``monitor`` (lowest loss, highest
    accuracy), or None if none has a checkpoint with it."""
    best = best_index(runs.loc[runs["monitor"] == monitor, "best_value"], metric_mode(monitor))
    return None if best is None else str(runs.loc[best, "run"])


def _cell(value: Any) -> str:
    """One table cell's text, escaped: integers with thousands separators, other numbers to 4 digits."""
    if not isinstance(value, str) and pd.isna(value):
        return ""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, Integral):
        return f"{value:,}"
    if isinstance(value, Real):
        value = float(value)
        return f"{value:,.0f}" if value.is_integer() and abs(value) >= 1000 else f"{value:.4g}"
    return escape(str(value))


def table_html(table: pd.DataFrame, marked: Callable[[pd.Series], bool] = lambda row: False) -> str:
    """``table`` as an HTML table, every cell escaped; rows for which ``marked(row)`` is true get class "best"."""
    head = "".join(f"<th>{escape(str(column))}</th>" for column in table.columns)
    body = []
    for _, row in table.iterrows():
        cells = "".join(f"<td>{_cell(value)}</td>" for value in row.tolist())
        body.append(f'<tr class="best">{cells}</tr>' if marked(row) else f"<tr>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _runs_section(runs: pd.DataFrame, monitor: str) -> str:
    best = best_run(runs, monitor)
    shown = runs[[c for c in TABLE_COLUMNS if c in runs.columns]]
    if best is None:
        note = f"No run has a checkpoint with {monitor} yet."
    else:
        row = runs.loc[runs["run"] == best].iloc[0]
        note = (f"Highlighted: the best run by {monitor} ({direction(metric_mode(monitor))}), {best}: "
                f"{row['best_value']:.4g} at step {int(row['best_step'])}, "
                f"checkpoint {Path(row['best_checkpoint']).name}.")
    table = table_html(shown, lambda r: r["run"] == best)
    return f'<p class="note">{escape(note)}</p>{table}'


# -- the page ---------------------------------------------------------------------------------


def _claims_section(checked: list[dict[str, Any]]) -> str:
    parts = []
    for claim in checked:
        verdict = claim["verdict"]
        figures = table_html(claim["figures"]) if len(claim["figures"]) else (
            '<p class="note">No rank has runs of both variants this claim compares.</p>')
        parts.append(f"<h3>{escape(claim['claim'])}</h3>"
                     f'<p>Verdict: <span class="verdict {verdict.replace(" ", "-")}">{escape(verdict)}</span></p>'
                     f'<p class="note">{escape(claim["test"])}</p>{figures}')
    return "".join(parts)


def _sections(runs: pd.DataFrame, metrics: pd.DataFrame, checkpoints: pd.DataFrame
              ) -> list[tuple[str, str, go.Figure | str]]:
    """(heading, note, figure or HTML) for each part of the report, in order."""
    from .plots import best_by_variant_and_rank, parameters_vs_metric, training_loss, validation_curves

    monitor = main_monitor(runs)
    same = runs[runs["monitor"] == monitor]
    logged = set(metrics.loc[metrics["split"] == "val", "metric"])
    shown = sorted(logged, key=lambda m: (f"val_{m}" != monitor, m))
    others = "" if len(same) == len(runs) else f" Only the {len(same)} runs that monitor {monitor} are compared."
    sections: list[tuple[str, str, go.Figure | str]] = [
        (f"Validation {m} at every evaluation", "Markers: the checkpoints saved.",
         validation_curves(metrics, m, checkpoints=checkpoints)) for m in shown]
    sections += [
        ("Training loss", "A moving mean over the last 20 steps.", training_loss(metrics)),
        (f"Best {monitor} by variant and rank", "Each run's best checkpoint by validation." + others,
         best_by_variant_and_rank(same)),
        (f"Trainable parameters against best {monitor}", "One point per run." + others, parameters_vs_metric(same)),
        ("Runs", "Every run in the directory; test figures are measured once, on the checkpoint validation chose.",
         _runs_section(runs, monitor)),
        ("Claims", "Published claims about the variants, checked on these runs.",
         _claims_section(check_claims(runs, metrics))),
    ]
    return sections


def _page(title: str, summary: str, sections: list[tuple[str, str, go.Figure | str]]) -> str:
    """The HTML page; plotly.js is embedded inline with the first figure only."""
    import plotly.graph_objects as go
    import plotly.io as pio

    parts, embedded = [], False
    for heading, note, content in sections:
        if isinstance(content, go.Figure):
            content = pio.to_html(content, include_plotlyjs=not embedded, full_html=False,
                                  default_height=FIGURE_HEIGHT)
            embedded = True
        parts.append(f'<section><h2>{escape(heading)}</h2><p class="note">{escape(note)}</p>{content}</section>')
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
            f"<style>{STYLE}</style></head><body><h1>{escape(title)}</h1><p>{escape(summary)}</p>"
            f"{''.join(parts)}</body></html>\n")


def write_report(directory: str | os.PathLike[str], to: str | os.PathLike[str] = "report.html") -> Path:
    """Write the HTML report of the runs under ``directory`` (or of the run it is) to ``to``; returns its path.

    One standalone file (plotly.js inline, no network needed): the validation metrics at every
    evaluation with the checkpoints marked, the training loss, the best validation metric by
    variant and rank, trainable parameters against it, the runs table with the best run
    highlighted, and the published claims with this sweep's figures and a verdict each.

    Raises:
        ValueError: ``directory`` holds no runs.
    """
    runs = load_runs(directory)
    if runs.empty:
        raise ValueError(f"{directory} holds no run directories (none with a config.json); nothing to report")
    metrics = load_metrics(directory)
    summary = (f"{len(runs)} runs in {directory}: task {', '.join(sorted(set(runs['task'])))}; variants "
               f"{', '.join(sorted(set(runs['variant'])))}; ranks {', '.join(map(str, sorted(set(runs['rank']))))}.")
    path = Path(to)
    if path.is_dir():
        raise ValueError(f"{path} is a directory; the report is a file: give a path such as {path / 'report.html'}")
    page = _page("Adapter workbench report", summary, _sections(runs, metrics, load_checkpoints(directory)))
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_text(path, page)
