"""The report, its figures and the claim checks, on run directories written by hand.

The numbers are chosen here so that every figure and verdict is known without the code under test.
"""

from __future__ import annotations

import json
import re
from html import escape

import pandas as pd
import pytest
from torch import nn

import workbench as wb
from workbench.claims import VERDICTS
from workbench.plots import best_by_variant_and_rank, parameters_vs_metric, training_loss, validation_curves
from workbench.report import write_report
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


def test_the_report_is_one_standalone_file_with_every_run_and_the_best_marked(sweep, tmp_path):
    path = write_report(sweep, tmp_path / "out" / "report.html")
    assert path == tmp_path / "out" / "report.html" and path.exists()
    html = path.read_text()
    assert html.count("* plotly.js v") == 1  # the library inline, once
    assert not re.search(r"<script[^>]*\ssrc\s*=", html, re.IGNORECASE)  # nothing fetched, from http or elsewhere
    assert html.count("Plotly.newPlot(") == 4  # Pareto fronts, lr sensitivity, validation bands, training loss
    tables = "".join(re.findall(r"<table>.*?</table>", html, re.DOTALL))
    for name in RUNS:
        assert f"<td>{name.replace('&', '&amp;').replace('<', '&lt;').replace('>', '&gt;')}</td>" in tables
    assert "<b>&" not in tables
    marked = re.findall(r'<tr class="best"><td>(.*?)</td>', tables)
    assert marked == ["lora-plus", BEST_RUN]  # the leaderboard's best configuration, the runs table's best run
    verdicts = re.findall(r'<span class="verdict [^"]*">(.*?)</span>', html)
    claims = wb.check_claims(sweep)
    assert verdicts == claims["verdict"].tolist() and set(verdicts) <= set(VERDICTS)
    for claim in claims["claim"]:
        assert escape(claim) in html
    answer = re.search(r'<p class="answer">(.*?)</p>', html).group(1)  # the page opens with the best configuration
    assert html.index(answer) < html.index("<h2>Claims</h2>") < html.index("Plotly.newPlot(")
    assert "lora-plus rank 4 lr 0.003" in answer and "0.38" in answer and "one seed" in answer


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
