"""The report of a runs directory: one standalone HTML file that opens with the answer.

First the best configuration (mean over seeds, its test metric with a 95% interval), then the
leaderboard of configurations (``wb.summarize``), the published claims with their verdicts
(``wb.check_claims``), the figures, and every run. Every table sorts by a clicked column (a few
lines of script in the page; the tables read as they are without it). ``write_report`` embeds plotly.js inline once, so
the file opens anywhere with no network. Every figure comes from ``workbench.plots``; every number
from the run directories.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from html import escape
from numbers import Integral, Real
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from .checkpoints.files import write_text
from .claims import check_claims
from .runs import checkpoint_cost, load_metrics, load_runs
from .runs.search import read_search, search_compute
from .selection import best_index, direction, metric_mode
from .stats import main_monitor, summarize

if TYPE_CHECKING:
    import plotly.graph_objects as go

RUN_COLUMNS = {"run": "run", "variant": "variant", "rank": "rank", "options": "options", "lr": "lr", "seed": "seed",
               "trainable": "trainable parameters", "peak_rss": "peak memory (MB)", "steps_done": "steps done",
               "best_step": "best step",
               "best_value": "best {monitor}", "test_loss": "test loss", "test_acc": "test accuracy",
               "wall_time": "wall time (s)", "status": "status"}
SUMMARY_COLUMNS = {"variant": "variant", "rank": "rank", "options": "options", "lr": "lr", "n": "seeds",
                   "best_mean": "best {monitor}: mean", "best_low": "best: 95% low", "best_high": "best: 95% high",
                   "test_mean": "{test}: mean", "test_low": "test: 95% low", "test_high": "test: 95% high",
                   "trainable": "trainable parameters", "peak_rss": "peak memory (MB)",
                   "wall_time": "wall time (s)", "diverged": "diverged runs"}
CLAIM_COLUMNS = {"claim": "claim", "source": "source", "task": "task", "rank": "rank", "effect": "effect",
                 "ci_low": "95% low", "ci_high": "95% high", "n": "seeds", "threshold": "threshold",
                 "verdict": "verdict"}
FIGURE_HEIGHT = 460
DEFAULT_MTBF = 4 * 3600.0  # the MTBF the checkpoint-interval figure assumes when no run set one: spot instances

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; padding: 0 1em; }
h1 { margin-bottom: 0.2em; } h2 { margin-top: 2em; border-bottom: 1px solid #ddd; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0 1em; }
th, td { border: 1px solid #ddd; padding: 0.25em 0.5em; text-align: right; }
th { background: #f3f3f3; } td:first-child, th:first-child { text-align: left; }
tr.best td { background: #fff3b0; font-weight: bold; }
.verdict { font-weight: bold; padding: 0.1em 0.5em; border-radius: 0.3em; }
.holds { background: #d4f4d4; } .does-not-hold { background: #f8d4d4; } .inconclusive { background: #fbeccb; }
.not-measured { background: #e8e8e8; }
.answer { font-size: 1.1em; background: #f6f8fa; padding: 0.8em 1em; border-left: 4px solid #4a7; }
.note { color: #555; }
"""


# -- tables -------------------------------------------------------------------------------------


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


def table_html(table: pd.DataFrame, marked: Callable[[pd.Series], bool] = lambda row: False,
               raw: Sequence[str] = ()) -> str:
    """``table`` as an HTML table, every cell escaped but those of the ``raw`` columns (HTML already); rows for
    which ``marked(row)`` is true get class "best"."""
    head = "".join(f"<th>{escape(str(column))}</th>" for column in table.columns)
    body = []
    for _, row in table.iterrows():
        cells = "".join(f"<td>{value if column in raw else _cell(value)}</td>" for column, value in row.items())
        body.append(f'<tr class="best">{cells}</tr>' if marked(row) else f"<tr>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _runs_table(runs: pd.DataFrame, monitor: str) -> str:
    """Every run, the best run by the monitor highlighted."""
    best = best_index(runs.loc[runs["monitor"] == monitor, "best_value"], metric_mode(monitor))
    best_name = None if best is None else runs.loc[best, "run"]
    columns = {k: v.format(monitor=monitor) for k, v in RUN_COLUMNS.items() if k in runs.columns}
    ordered = runs.sort_values("best_value", ascending=metric_mode(monitor) == "min", na_position="last",
                               kind="stable")
    if "peak_rss" in ordered:
        ordered = ordered.assign(peak_rss=ordered["peak_rss"] / 1e6)
    shown = ordered[list(columns)].rename(columns=columns)
    return f'<div class="scroll">{table_html(shown, lambda row: row["run"] == best_name)}</div>'


def _answer(summary: pd.DataFrame, monitor: str) -> str:
    """The best configuration by the mean of its runs' best validation values, with its test metric."""
    if summary.empty or summary["n"].iloc[0] == 0:
        return f'<p class="answer">No run has a checkpoint with {escape(monitor)} yet.</p>'
    row = summary.iloc[0]
    name = " ".join(str(part) for part in (row["variant"], "" if pd.isna(row["rank"]) else f"rank {row['rank']}",
                                           f"lr {row['lr']:g}", row["options"]) if part)
    test = (f"{row['test_metric']} {row['test_mean']:.4g}" if not math.isnan(row["test_mean"]) else
            f"{row['test_metric']} not measured")
    if not math.isnan(row["test_low"]):
        test += f" (95% interval {row['test_low']:.4g} to {row['test_high']:.4g})"
    spread = (f", 95% interval {row['best_low']:.4g} to {row['best_high']:.4g}" if not math.isnan(row["best_low"])
              else " (one seed: no interval)")
    return (f'<p class="answer">Best configuration: <b>{escape(name)}</b> on {escape(str(row["task"]))}, '
            f"{direction(metric_mode(monitor))} mean {escape(monitor)} {row['best_mean']:.4g}{escape(spread)} over "
            f"{row['n']} seed{'s' if row['n'] != 1 else ''}; {escape(test)}.</p>")


def _claims_table(claims: pd.DataFrame) -> str:
    shown = claims[list(CLAIM_COLUMNS)].rename(columns=CLAIM_COLUMNS)
    shown["verdict"] = [f'<span class="verdict {v.replace(" ", "-")}">{escape(v)}</span>' for v in claims["verdict"]]
    notes = "".join(f"<li><b>{escape(c)}</b>: {escape(m)}</li>"
                    for c, m in claims[["claim", "measurement"]].drop_duplicates("claim").itertuples(index=False))
    return f'<div class="scroll">{table_html(shown, raw=["verdict"])}</div><ul class="note">{notes}</ul>'


def _summary_table(summary: pd.DataFrame, monitor: str) -> str:
    test = summary["test_metric"].iloc[0] if len(summary) else "test"
    columns = {k: v.format(monitor=monitor, test=test) for k, v in SUMMARY_COLUMNS.items()}
    shown = summary.assign(peak_rss=summary["peak_rss"] / 1e6)[list(columns)].rename(columns=columns)
    first = shown.index[0] if len(shown) else None
    return f'<div class="scroll">{table_html(shown, lambda row: row.name == first)}</div>'


def _sections(runs: pd.DataFrame, metrics: pd.DataFrame, summary: pd.DataFrame, claims: pd.DataFrame,
              monitor: str) -> list[tuple[str, str, go.Figure | str]]:
    """(heading, note, figure or HTML) for each part of the report after the answer, in order."""
    from . import plots

    others = "" if (runs["monitor"] == monitor).all() else f" Only the runs that monitor {monitor} are compared."
    metric = monitor.removeprefix("val_")
    return [
        ("Leaderboard", f"One row per configuration (variant, rank, learning rate, options), best first by mean "
         f"best {monitor} over its seeds; the test metric is measured once per run, on the checkpoint validation "
         f"chose.{others}", _summary_table(summary, monitor)),
        ("Claims", "Published claims about the variants, checked on these runs over paired seeds: an effect, its "
         "95% interval and a verdict; inconclusive where the interval spans the threshold or one seed ran.",
         _claims_table(claims)),
        ("Cost against quality", "Each configuration's mean best validation value (bars: 95% interval over seeds) "
         "against what it costs; the line joins the Pareto front.", plots.pareto_fronts(summary)),
        ("Learning-rate sensitivity", "Mean best validation value against the learning rate; bands: 95% interval "
         "over seeds.", plots.lr_sensitivity(summary)),
        (f"Validation {metric} at every evaluation", "One panel per variant; the mean over seeds of each "
         "configuration with its band. Diverged runs are flagged and left out.",
         plots.validation_bands(runs, metrics, metric)),
        ("Training loss", "A moving mean over the last 20 steps.", plots.training_loss(metrics)),
        ("Runs", "Every run in the directory, best first; the best run by validation is highlighted.",
         _runs_table(runs, monitor)),
    ] + _compression_section(runs, monitor)


def _compression_section(runs: pd.DataFrame, monitor: str) -> list[tuple[str, str, go.Figure | str]]:
    """The compression figure, where the runs include the stages of ``wb.compress_task``; else nothing."""
    from . import plots

    if "compression_stage" not in runs or runs["compression_stage"].isna().all():
        return []
    value = "test_" + monitor.removeprefix("val_")
    value = value if value in runs else "test_loss"
    return [("Compression", "The test metric of each stage of a compressed model against its parameter count: "
             "svd (the original, factorised at full rank), rank-reduced (truncated) and finetuned (recovered).",
             plots.compression_stages(runs, value))]


def _search_section(directory: str | os.PathLike[str], runs: pd.DataFrame,
                    grid: str | os.PathLike[str] | None) -> list[tuple[str, str, go.Figure | str]]:
    """What a search that prunes cost against the full grid of its space (and, given the grid's runs, whether it
    found the grid's best); nothing for a directory that holds no search."""
    search = read_search(directory)
    if search is None:
        return []
    compute = search_compute(runs, search, None if grid is None else load_runs(grid))
    rows = [("trials", compute["trials"], ""), ("configurations trained", compute["runs"], compute["grid_runs"]),
            ("pruned", compute["pruned"], 0), ("optimizer steps", compute["steps"], compute["grid_steps"]),
            ("wall time (s, summed over runs)", compute["wall_time"], compute.get("grid_wall_time", "")),
            (f"best run (by best {search['monitor']})", compute["best_run"], compute.get("grid_best_run", "")),
            (f"its best {search['monitor']}", compute["best_value"], compute.get("grid_best_value", ""))]
    table = pd.DataFrame(rows, columns=["", "this search", "the full grid"])
    found = "" if grid is None else (" It found the grid's best configuration." if compute["same_best"] else
                                     " It did not find the grid's best configuration.")
    note = (f"An {search['search']} search ({search['executor']}) of {compute['grid_runs']} configurations, "
            f"{search['trials']} trials, pruner {search['pruner']}: it trained "
            f"{compute['steps'] / compute['grid_steps']:.0%} of the full grid's optimizer steps.{found}"
            + ("" if grid is not None else " The grid's wall time and best are shown when its runs are given "
                                           "(write_report(..., grid=DIR), workbench report --grid DIR)."))
    return [("Search", note, table_html(table))]


def _save_interval_section(directory: str | os.PathLike[str], runs: pd.DataFrame
                           ) -> list[tuple[str, str, go.Figure | str]]:
    """The checkpoint interval's trade-off for the runs' measured write cost; nothing if no write was timed."""
    from . import plots

    costs = checkpoint_cost(directory)
    timed = costs[costs["checkpoints"] > 0]
    if timed.empty:
        return []
    write = float(timed["write_seconds"].median())
    mtbf = timed["mtbf"].dropna()
    assumed = mtbf.empty
    mtbf_seconds = float(mtbf.median()) if not assumed else DEFAULT_MTBF
    chosen = timed["interval_steps"] * timed["step_seconds"]
    chosen = float(chosen.dropna().median()) if chosen.notna().any() else None
    note = (f"Each checkpoint took {write:.3g} s to write (the median over {len(timed)} runs' "
            f"{int(timed['checkpoints'].sum())} timed writes); writing took {timed['overhead'].median():.2%} of a "
            f"run's time (median). The expected share of time lost, to writing and to work redone after failures "
            f"every {mtbf_seconds / 3600:.3g} h" + (" (assumed: no run set mtbf)" if assumed else "")
            + ", against the interval; save_every='auto' picks the optimum.")
    return [("How often to save", note, plots.save_interval(write, mtbf_seconds, chosen))]


SORTABLE = """  // every table: a click on a column's header sorts its rows by it, ascending, then descending
document.querySelectorAll("table").forEach(table => table.querySelectorAll("th").forEach((th, column) => {
  th.title = "click to sort"; th.style.cursor = "pointer";
  th.addEventListener("click", () => {
    const body = table.tBodies[0], up = th.dataset.order !== "up";
    const key = row => { const text = row.cells[column].textContent.replace(/,/g, "").trim();
                         const number = parseFloat(text); return text === "" ? null : isNaN(number) ? text : number; };
    const rows = Array.from(body.rows).sort((a, b) => {
      const x = key(a), y = key(b);
      if (x === null || y === null) return (x === null) - (y === null);  // empty cells last either way
      if (typeof x !== typeof y) return typeof x === "number" ? -1 : 1;
      const order = x > y ? 1 : x < y ? -1 : 0;
      return up ? order : -order;
    });
    table.querySelectorAll("th").forEach(other => { if (other !== th) delete other.dataset.order; });
    th.dataset.order = up ? "up" : "down";
    rows.forEach(row => body.appendChild(row));
  });
}));
"""


def _page(title: str, lead: str, sections: list[tuple[str, str, go.Figure | str]]) -> str:
    """The HTML page; plotly.js is embedded inline with the first figure only."""
    import plotly.graph_objects as go
    import plotly.io as pio

    parts, embedded = [], False
    for heading, note, content in sections:
        if isinstance(content, go.Figure):
            content = pio.to_html(content, include_plotlyjs=not embedded, full_html=False,
                                  default_height=FIGURE_HEIGHT, config={"responsive": True})
            embedded = True
        parts.append(f'<section><h2>{escape(heading)}</h2><p class="note">{escape(note)}</p>{content}</section>')
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
            f"<style>{STYLE}</style></head><body><h1>{escape(title)}</h1>{lead}"
            f"{''.join(parts)}<script>{SORTABLE}</script></body></html>\n")


def write_report(directory: str | os.PathLike[str], to: str | os.PathLike[str] = "report.html",
                 grid: str | os.PathLike[str] | None = None) -> Path:
    """Write the HTML report of the runs under ``directory`` (or of the run it is) to ``to``; returns its path.

    One standalone file (plotly.js inline, no network needed). It opens with the answer (the best
    configuration by mean validation value over its seeds, and its test metric with a 95%
    interval), then the leaderboard of configurations, the claims with their verdicts, the Pareto
    fronts of trainable parameters, peak memory and wall time against the validation metric, the
    learning-rate sensitivity, the validation curves by variant, the training loss and every run;
    then, where they apply, the compression stages, the compute of a search that pruned against the
    full grid of its space (``grid``: that grid's runs directory, to compare wall time and the best
    found), and the checkpoint interval's trade-off for the measured write cost.

    Raises:
        ValueError: ``directory`` holds no runs, or ``to`` is a directory.
    """
    path = Path(to)
    if path.is_dir():
        raise ValueError(f"{path} is a directory; the report is a file: give a path such as {path / 'report.html'}")
    runs = load_runs(directory)
    if runs.empty:
        raise ValueError(f"{directory} holds no run directories (none with a config.json); nothing to report")
    metrics = load_metrics(directory)
    monitor = main_monitor(runs)
    summary = summarize(runs[runs["monitor"] == monitor])
    claims = check_claims(runs, metrics)
    lead = (f'<p class="note">{len(runs)} runs in {escape(str(directory))}: task '
            f"{escape(', '.join(sorted(set(runs['task']))))}; {len(summary)} configurations.</p>"
            + _answer(summary, monitor))
    page = _page("Adapter workbench report", lead,
                 _sections(runs, metrics, summary, claims, monitor) + _search_section(directory, runs, grid)
                 + _save_interval_section(directory, runs))
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_text(path, page)
