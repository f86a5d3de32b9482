"""The report, its figures and the claim checks, on run directories written by hand.

The numbers are chosen here so that every figure and verdict is known without the code under test.
"""

from __future__ import annotations

import json
import re

import pandas as pd
import pytest
from torch import nn

import workbench as wb
from workbench.plots import best_by_variant_and_rank, parameters_vs_metric, training_loss, validation_curves
from workbench.report import FAILS, HOLDS, UNMEASURED, check_claims, write_report
from workbench.runs import load_metrics, load_runs

EVALUATED = (10, 20, 30, 40)
SAVED = (20, 40)
# name: variant, rank, lr, trainable, saved_bytes, validation losses and accuracies at EVALUATED
RUNS = {
    "lora-r4-lr0.003-s0": ("lora", 4, 3e-3, 1000, 4000, (1.0, 0.6, 0.5, 0.45), (0.5, 0.7, 0.8, 0.82)),
    "lora-r4-lr0.01-s0": ("lora", 4, 1e-2, 1000, 4000, (1.2, 0.9, 0.7, 0.65), (0.4, 0.6, 0.7, 0.75)),
    "lora-plus-r4-lr0.003-s0": ("lora-plus", 4, 3e-3, 1000, 4000, (0.8, 0.44, 0.4, 0.38), (0.6, 0.8, 0.83, 0.85)),
    "vera-r4-lr0.003-s0": ("vera", 4, 3e-3, 90, 3800, (1.1, 0.8, 0.6, 0.55), (0.5, 0.7, 0.79, 0.78)),
    "lora-fa-r4-lr0.003-s0": ("lora-fa", 4, 3e-3, 500, 2500, (1.0, 0.7, 0.55, 0.5), (0.5, 0.7, 0.78, 0.8)),
    "delta-lora-r4-lr0.003-s0": ("delta-lora", 4, 3e-3, 1000, 4000, (0.9, 0.6, 0.46, 0.47), (0.5, 0.7, 0.8, 0.8)),
    "lora-r8 <b>&": ("lora", 8, 3e-3, 2000, 5000, (0.9, 0.7, 0.6, 0.55), (0.5, 0.6, 0.7, 0.72)),
}
BEST_RUN = "lora-plus-r4-lr0.003-s0"  # lowest val_loss at a checkpoint: 0.38 at step 40


def _train_loss(step: int) -> float:
    return 2.0 / step


def _write_run(directory, name, variant, rank, lr, trainable, saved_bytes, losses, accuracies) -> None:
    run = directory / name
    run.mkdir(parents=True)
    settings = {"task": "digits", "variant": variant, "rank": rank, "alpha": 2.0 * rank, "targets": None,
                "options": {}, "lr": lr, "seed": 0, "steps": 40, "monitor": "val_loss", "mode": "min"}
    record = {"settings": settings, "status": "finished", "trainable": trainable, "saved_bytes": saved_bytes,
              "wall_time": 1.5, "steps_done": 40, "test": {"test_loss": losses[-1], "test_acc": accuracies[-1]}}
    (run / "config.json").write_text(json.dumps(record))
    lines = [{"step": s, "split": "train", "metric": "loss", "value": _train_loss(s), "time": 0.0} for s in range(1, 41)]
    for step, loss, acc in zip(EVALUATED, losses, accuracies, strict=True):
        lines += [{"step": step, "split": "val", "metric": "loss", "value": loss, "time": 0.0},
                  {"step": step, "split": "val", "metric": "acc", "value": acc, "time": 0.0}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    with wb.CheckpointManager(run / "checkpoints") as manager:
        for step in SAVED:
            at = EVALUATED.index(step)
            manager.save(step, nn.Linear(2, 2), metrics={"val_loss": losses[at], "val_acc": accuracies[at]})


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    directory = tmp_path_factory.mktemp("runs")
    for name, row in RUNS.items():
        _write_run(directory, name, *row)
    return directory


def _verdicts(checked: list[dict]) -> list[str]:
    return [claim["verdict"] for claim in checked]


def test_claims_on_the_sweep_give_the_chosen_figures_and_verdicts(sweep):
    speed, vera, memory, delta = check_claims(load_runs(sweep), load_metrics(sweep))
    assert _verdicts([speed, vera, memory, delta]) == [HOLDS, HOLDS, HOLDS, FAILS]
    for claim in (speed, vera, memory, delta):  # rank 8 has lora only: no pair
        assert claim["figures"][["task", "rank"]].values.tolist() == [["digits", 4]]
    row = speed["figures"].iloc[0]  # L is the better lora run's 0.45 (step 40); lora-plus has 0.44 at step 20
    assert (row["LoRA best val loss L"], row["LoRA steps to L"], row["LoRA+ steps to L"]) == (0.45, 40, 20)
    row = vera["figures"].iloc[0]
    assert row["ratio"] == pytest.approx(1000 / 90) and row["accuracy drop"] == pytest.approx(0.82 - 0.79)
    row = memory["figures"].iloc[0]
    assert (row["LoRA saved bytes"], row["LoRA-FA saved bytes"]) == (4000, 2500)
    row = delta["figures"].iloc[0]  # 0.46 > 0.45 * 1.01
    assert row["Delta-LoRA / LoRA"] == pytest.approx(0.46 / 0.45) and row["verdict"] == FAILS


def _runs(*rows: tuple[str, str, int, int, int]) -> pd.DataFrame:
    """A runs table of (run, variant, rank, trainable, saved_bytes) on one task."""
    return pd.DataFrame([{"run": r, "task": "t", "variant": v, "rank": k, "trainable": p, "saved_bytes": b}
                         for r, v, k, p, b in rows])


def _metrics(logged: dict[str, dict[str, list[float]]]) -> pd.DataFrame:
    """Validation metrics logged at steps 10, 20, ...: {run: {metric: values}}."""
    return pd.DataFrame([{"run": run, "step": 10 * (i + 1), "split": "val", "metric": metric, "value": value}
                         for run, series in logged.items() for metric, values in series.items()
                         for i, value in enumerate(values)])


CASES = {
    "lora-plus never reaches L; nothing else ran": (
        _runs(("a", "lora", 2, 100, 10), ("b", "lora-plus", 2, 100, 10)),
        {"a": {"loss": [0.9, 0.5]}, "b": {"loss": [0.8, 0.6]}},
        [FAILS, UNMEASURED, UNMEASURED, UNMEASURED]),
    "lora-plus reaches L at the same step: a tie": (
        _runs(("a", "lora", 2, 100, 10), ("b", "lora-plus", 2, 100, 10)),
        {"a": {"loss": [0.9, 0.5]}, "b": {"loss": [0.8, 0.4]}},
        [FAILS, UNMEASURED, UNMEASURED, UNMEASURED]),
    "variants at different ranks are not compared": (
        _runs(("a", "lora", 2, 100, 10), ("b", "lora-plus", 8, 100, 10), ("c", "vera", 8, 1, 10),
              ("d", "lora-fa", 8, 50, 5), ("e", "delta-lora", 8, 100, 10)),
        {"a": {"loss": [0.5], "acc": [0.9]}, "b": {"loss": [0.4]}, "c": {"loss": [0.5], "acc": [0.9]},
         "e": {"loss": [0.4]}},
        [UNMEASURED, UNMEASURED, UNMEASURED, UNMEASURED]),
    "vera exactly 10x fewer, a small drop; lora-fa equal; delta within 1%": (
        _runs(("a", "lora", 2, 1000, 10), ("c", "vera", 2, 100, 9), ("d", "lora-fa", 2, 500, 10),
              ("e", "delta-lora", 2, 1000, 10)),
        {"a": {"loss": [0.5], "acc": [0.9]}, "c": {"loss": [0.6], "acc": [0.87]}, "e": {"loss": [0.504]}},
        [UNMEASURED, HOLDS, FAILS, HOLDS]),
    "vera 9x fewer": (
        _runs(("a", "lora", 2, 900, 10), ("c", "vera", 2, 100, 9)),
        {"a": {"acc": [0.9]}, "c": {"acc": [0.9]}},
        [UNMEASURED, FAILS, UNMEASURED, UNMEASURED]),
    "vera loses 0.06 accuracy": (
        _runs(("a", "lora", 2, 2000, 10), ("c", "vera", 2, 100, 9)),
        {"a": {"acc": [0.9]}, "c": {"acc": [0.84]}},
        [UNMEASURED, FAILS, UNMEASURED, UNMEASURED]),
    "vera holds at rank 2, fails at rank 8": (
        _runs(("a", "lora", 2, 2000, 10), ("c", "vera", 2, 100, 9), ("A", "lora", 8, 800, 10),
              ("C", "vera", 8, 100, 9)),
        {"a": {"acc": [0.9]}, "c": {"acc": [0.89]}, "A": {"acc": [0.9]}, "C": {"acc": [0.89]}},
        [UNMEASURED, FAILS, UNMEASURED, UNMEASURED]),
}


@pytest.mark.parametrize("case", CASES)
def test_claim_verdicts(case):
    runs, logged, expected = CASES[case]
    assert _verdicts(check_claims(runs, _metrics(logged))) == expected


def test_the_report_is_one_standalone_file_with_every_run_and_the_best_marked(sweep, tmp_path):
    path = write_report(sweep, tmp_path / "out" / "report.html")
    assert path == tmp_path / "out" / "report.html" and path.exists()
    html = path.read_text()
    assert html.count("* plotly.js v") == 1  # the library inline, once
    assert not re.search(r"<script[^>]*\ssrc\s*=", html, re.IGNORECASE)  # nothing fetched, from http or elsewhere
    assert html.count("Plotly.newPlot(") == 5  # val loss, val acc, train loss, best by variant and rank, parameters
    tables = "".join(re.findall(r"<table>.*?</table>", html, re.DOTALL))
    for name in RUNS:
        assert f"<td>{name.replace('&', '&amp;').replace('<', '&lt;').replace('>', '&gt;')}</td>" in tables
    assert "<b>&" not in tables
    marked = re.findall(r'<tr class="best"><td>(.*?)</td>', tables)
    assert marked == [BEST_RUN]
    verdicts = re.findall(r'<span class="verdict [^"]*">(.*?)</span>', html)
    assert verdicts == [HOLDS, HOLDS, HOLDS, FAILS]


def test_a_directory_without_runs_has_no_report(tmp_path):
    with pytest.raises(ValueError, match="no run"):
        write_report(tmp_path, tmp_path / "report.html")


def test_figures_draw_the_tables(sweep):
    metrics, runs = load_metrics(sweep), load_runs(sweep)
    checkpoints = pd.DataFrame([{"run": name, "step": step} for name in RUNS for step in SAVED])
    traces = {t.name: t for t in validation_curves(metrics, "loss", checkpoints=checkpoints).data}
    name = "vera-r4-lr0.003-s0"
    losses = RUNS[name][5]
    assert list(traces[name].x) == list(EVALUATED) and list(traces[name].y) == list(losses)
    marks = traces[f"{name} checkpoints"]
    assert list(marks.x) == list(SAVED) and list(marks.y) == [losses[1], losses[3]]

    smoothed = training_loss(metrics, runs=[name], smooth=3).data
    expected = [sum(_train_loss(s) for s in range(max(1, step - 2), step + 1)) / min(step, 3) for step in range(1, 41)]
    assert len(smoothed) == 1 and list(smoothed[0].y) == pytest.approx(expected)

    bars = {t.name: t for t in best_by_variant_and_rank(runs).data}
    assert list(bars["lora"].x) == ["rank 4", "rank 8"] and list(bars["lora"].y) == [0.45, 0.55]
    assert bars["lora"].customdata[0] == "lora-r4-lr0.003-s0"  # the better of the two lora runs at rank 4

    points = {t.name: t for t in parameters_vs_metric(runs).data}
    assert sorted(points["lora"].x) == [1000, 1000, 2000] and list(points["vera"].x) == [90]
    assert parameters_vs_metric(runs).layout.xaxis.type == "log"


@pytest.mark.parametrize("draw, table, column", [
    (validation_curves, "metrics", "step"),
    (training_loss, "metrics", "split"),
    (best_by_variant_and_rank, "runs", "rank"),
    (parameters_vs_metric, "runs", "trainable"),
])
def test_figures_name_the_columns_they_miss(sweep, draw, table, column):
    data = load_metrics(sweep) if table == "metrics" else load_runs(sweep)
    with pytest.raises(ValueError, match=f"lacks the column\\(s\\) {column}"):
        draw(data.drop(columns=column))
