"""Evaluation benchmark: validation throughput, merged under torch.inference_mode, against the training forward.

Run by hand: ``.venv/bin/python benchmarks/evaluation.py`` (a few minutes on 2 CPU cores);
``--share`` adds a reviews run's share of wall time spent evaluating (about a minute more);
``--bf16`` adds bf16 autocast. While developing: ``--tasks reviews --batches 2 --repeats 1``.

Tasks: ``reviews`` (MiniLM-L6 classifier, lora r = 8 on query, key and value, the head trained in
full) and ``hamlet`` (SmolLM2-135M, lora r = 8 on q_proj and v_proj), over the val split, 64 texts
or 8 blocks of 64 tokens a batch (the first ``--batches`` batches; default all: 20 and 11). B is
drawn N(0, 0.01^2) instead of starting at zero, so that merged weights differ from the base ones as
after training (with B = 0, merging would change nothing and the loss check below would be empty).

Ways, interleaved over ``--repeats`` rounds after a one-batch warm-up of each, medians:

- training forward: ``model.train()``, grad enabled, forward and loss only (no backward): what a
  training step spends before its backward, dropout on;
- ``wb.evaluate``: the library's evaluation as it is (eval mode, ``torch.no_grad``, adapters unmerged);
- inference_mode: the same under ``torch.inference_mode()``, adapters unmerged (which of the two
  changes below makes the difference);
- merged + inference_mode: ``wb.merge_adapters``, then ``wb.evaluate`` under ``torch.inference_mode()``,
  then ``wb.unmerge_adapters``; the merge and unmerge are timed apart, as their own cost;
- bf16 (``--bf16``): ``wb.evaluate(..., precision="bf16")``, unmerged.

Printed: seconds, examples/s, speed-ups against the training forward and against ``wb.evaluate``,
each way's |val_loss - wb.evaluate's| (float32 rounding for the merged one: each batch's loss is a
float32 scalar, whose last bit at a loss of 5 is 4.8e-7) and whether the accuracy is the same, how far
the merge + unmerge cycles moved the base weights (rounding: W + D - D need not be W), then a markdown
table.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

import workbench as wb

RANK = 8
B_STD = 0.01
TASKS = ("reviews", "hamlet")
Way = Callable[[nn.Module, wb.Task, object, int | None], dict[str, float]]


def adapted(task: wb.Task) -> nn.Module:
    """The task's base with lora r = 8 on its default targets (and head), B drawn N(0, B_STD^2)."""
    torch.manual_seed(0)
    model = wb.add_adapters(task.base_model(), "lora", RANK, targets=list(task.default_targets),
                            train=list(task.default_train) if task.default_train else None)
    with torch.no_grad():
        for _, layer in wb.adapter_layers(model):
            layer.lora_B.normal_(0.0, B_STD)
    return model


def training_forward(model: nn.Module, task: wb.Task, loader: object, batches: int | None) -> dict[str, float]:
    """Forward and loss in training mode with grad enabled, as a training step before its backward; no metrics."""
    model.train()
    with torch.enable_grad():
        for inputs, targets in itertools.islice(loader, batches):
            task.loss(model(inputs), targets).item()
    return {}


def library(model: nn.Module, task: wb.Task, loader: object, batches: int | None, precision: str = "float32"
            ) -> dict[str, float]:
    return wb.evaluate(model, loader, task.loss, task.counts, batches=batches, precision=precision,
                       perplexity=task.perplexity)


def inference(model: nn.Module, task: wb.Task, loader: object, batches: int | None) -> dict[str, float]:
    with torch.inference_mode():
        return library(model, task, loader, batches)


def bf16(model: nn.Module, task: wb.Task, loader: object, batches: int | None) -> dict[str, float]:
    return library(model, task, loader, batches, precision="bf16")


# name -> (how, whether the adapters are merged around it)
WAYS: dict[str, tuple[Way, bool]] = {"training forward": (training_forward, False), "wb.evaluate": (library, False),
                                     "inference_mode": (inference, False),
                                     "merged + inference_mode": (inference, True), "bf16 autocast": (bf16, False)}


def timed(name: str, model: nn.Module, task: wb.Task, loader: object, batches: int | None
          ) -> tuple[float, float, dict[str, float]]:
    """(seconds of the evaluation, seconds of merge + unmerge, metrics) of one way."""
    how, folding = WAYS[name]
    start = time.perf_counter()
    if folding:
        wb.merge_adapters(model)
    middle = time.perf_counter()
    metrics = how(model, task, loader, batches)
    end = time.perf_counter()
    if folding:
        wb.unmerge_adapters(model)
    return end - middle, (middle - start) + (time.perf_counter() - end), metrics


def measure(task_name: str, ways: list[str], batches: int | None, repeats: int) -> list[dict[str, object]]:
    """One row per way: median seconds, examples/s, ratios, metric differences; and merge + unmerge."""
    task = wb.tasks.reviews() if task_name == "reviews" else wb.tasks.hamlet()
    model = adapted(task)
    loader = task.loaders(0)["val"]
    sizes = [len(inputs) for inputs, _ in itertools.islice(loader, batches)]
    count = sum(sizes)
    for name in ways:  # warm-up: one batch each
        timed(name, model, task, loader, 1)
    weights = {name: layer.base_weight().clone() for name, layer in wb.adapter_layers(model)}
    seconds: dict[str, list[float]] = {name: [] for name in ways}
    folding: list[float] = []
    metrics: dict[str, dict[str, float]] = {}
    for _ in range(repeats):
        for name in ways:
            elapsed, fold, metrics[name] = timed(name, model, task, loader, batches)
            seconds[name].append(elapsed)
            if WAYS[name][1]:
                folding.append(fold)
    median = {name: statistics.median(values) for name, values in seconds.items()}
    reference = metrics["wb.evaluate"]
    rows: list[dict[str, object]] = []
    for name in ways:
        row = {"task": task_name, "way": name, "seconds": median[name], "per_s": count / median[name],
               "vs_train": median["training forward"] / median[name], "vs_eval": median["wb.evaluate"] / median[name]}
        if metrics[name]:  # the training forward has none (dropout is on there)
            row |= {"loss_diff": abs(metrics[name]["val_loss"] - reference["val_loss"]),
                    "same_acc": metrics[name]["val_acc"] == reference["val_acc"]}
        rows.append(row)
    drift = max(float((layer.base_weight() - weights[name]).abs().max()) for name, layer in wb.adapter_layers(model))
    if folding:
        rows.append({"task": task_name, "way": "merge + unmerge", "seconds": statistics.median(folding)})
    print(f"{task_name}: {count} val examples in {len(sizes)} batches, val_loss {reference['val_loss']:.4f}; "
          f"base weights after {len(folding) + 1} merge + unmerge: max |W - W0| = {drift:.1e}")
    return rows


def evaluation_share() -> dict[str, float]:
    """A reviews lora r = 8 run as the main job makes it (steps 100, validation every 50): times from its record."""
    with tempfile.TemporaryDirectory() as tmp:
        run = wb.Run("reviews", "lora", RANK, Path(tmp) / "run", steps=100, eval_every=50, progress_bar=False)
        record = run.fit()
        return {"wall": record["wall_time"], "validation": run.trainer.eval_time, "evaluation": record["eval_time"]}


def cell(row: dict[str, object], key: str, fmt: str) -> str:
    return format(row[key], fmt) if key in row else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    parser.add_argument("--batches", type=int, default=None, help="the first N val batches (default: all)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--bf16", action="store_true", help="also time bf16 autocast (unmerged)")
    parser.add_argument("--share", action="store_true", help="also time a 100-step reviews run's evaluation share")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ways = [name for name in WAYS if args.bf16 or name != "bf16 autocast"]
    print(f"torch {torch.__version__}, {args.threads} threads; lora r={RANK}, B ~ N(0, {B_STD}^2); "
          f"median of {args.repeats} interleaved repeats")
    rows = [row for task in args.tasks for row in measure(task, ways, args.batches, args.repeats)]
    for row in rows:
        ratios = (f"{row['per_s']:8.1f} ex/s  x{row['vs_train']:.2f} vs training forward  x{row['vs_eval']:.2f} vs "
                  f"wb.evaluate" if "per_s" in row else "")
        if "loss_diff" in row:
            ratios += f"  |val_loss diff| {row['loss_diff']:.1e}, same accuracy: {row['same_acc']}"
        print(f"  {row['task']:<8} {row['way']:<24} {row['seconds'] * 1000:8.1f} ms  {ratios}")
    share = evaluation_share() if args.share else None
    if share is not None:
        print(f"  reviews run, 100 steps, validation every 50: wall {share['wall']:.1f} s, validation "
              f"{share['validation']:.1f} s ({share['validation'] / share['wall']:.1%}), validation + test "
              f"{share['evaluation']:.1f} s ({share['evaluation'] / share['wall']:.1%})")
    print("\n| task | way | time | examples/s | speed-up vs training forward | vs `wb.evaluate` "
          "| \\|val_loss diff\\| |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        print(f"| {row['task']} | {row['way']} | {row['seconds'] * 1000:.1f} ms | {cell(row, 'per_s', '.1f')} "
              f"| {cell(row, 'vs_train', '.2f')} | {cell(row, 'vs_eval', '.2f')} | {cell(row, 'loss_diff', '.1e')} |")
    if share is not None:
        print("\n| run | wall | validation | validation + test |\n| --- | --- | --- | --- |")
        print(f"| reviews, lora r = {RANK}, 100 steps, validation every 50 | {share['wall']:.1f} s "
              f"| {share['validation']:.1f} s ({share['validation'] / share['wall']:.1%}) "
              f"| {share['evaluation']:.1f} s ({share['evaluation'] / share['wall']:.1%}) |")


if __name__ == "__main__":
    main()
