"""Trainer benchmark: wb.Trainer against a hand-written torch loop on the same model and data.

Run by hand: ``.venv/bin/python benchmarks/trainer.py`` (under a minute on 2 CPU cores).

Both loops train the same LoRA model on the same batches of a built-in task for the same
number of steps; the hand-written loop is the minimum: next batch, forward, loss, backward,
step. The trainer adds what it is for: the training-loss log, the progress bar off (as in a
sweep), and, in the second comparison, a checkpoint every 50 steps. Runs are interleaved and
the best of several repeats is kept for each, so background noise hits both alike.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

import workbench as wb
from workbench.tasks import get_task
from workbench.trainer import Trainer


def hand_written(task_name: str, steps: int) -> float:
    task = get_task(task_name)
    model = wb.add_adapters(task.base_model(), "lora", 8, targets=task.default_targets)
    optimizer = wb.make_optimizer(model, lr=3e-3)
    loader = task.loaders(0)["train"]
    batches = iter(loader)
    start = time.perf_counter()
    for _ in range(steps):
        try:
            inputs, targets = next(batches)
        except StopIteration:
            batches = iter(loader)
            inputs, targets = next(batches)
        loss = task.loss(model(inputs), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss.item()
    return time.perf_counter() - start


def with_trainer(task_name: str, steps: int, save_every: int | None) -> float:
    task = get_task(task_name)
    model = wb.add_adapters(task.base_model(), "lora", 8, targets=task.default_targets)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(model, task, lr=3e-3, steps=steps, eval_every=10 * steps, save_every=save_every or 10 * steps,
                          checkpoints=Path(tmp) / "checkpoints" if save_every else None,
                          metrics_log=Path(tmp) / "metrics.jsonl", progress_bar=False)
        # time training only: the hand-written loop does not validate
        trainer.evaluate = lambda split="val", batches=None: {"val_loss": 0.0, "val_acc": 0.0}
        start = time.perf_counter()
        trainer.fit()
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="sequence")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    get_task(args.task).base_model()  # pre-train and cache the base outside the timings
    times: dict[str, list[float]] = {"hand-written loop": [], "trainer": [], "trainer + checkpoint every 50": []}
    for _ in range(args.repeats):
        times["hand-written loop"].append(hand_written(args.task, args.steps))
        times["trainer"].append(with_trainer(args.task, args.steps, None))
        times["trainer + checkpoint every 50"].append(with_trainer(args.task, args.steps, 50))
    best = {label: min(values) for label, values in times.items()}
    print(f"task {args.task}, lora r=8, {args.steps} steps, {args.threads} threads, best of {args.repeats}")
    for label, seconds in best.items():
        print(f"  {label:<30} {seconds:6.2f} s  {args.steps / seconds:7.1f} steps/s")
    ratio = best["hand-written loop"] / best["trainer"]
    print(f"  trainer steps/s over the hand-written loop's: {ratio:.3f} (goal >= 0.95)")
    overhead = best["trainer + checkpoint every 50"] / best["trainer"] - 1
    print(f"  checkpointing every 50 steps costs {overhead * 100:+.1f}% (goal < 5%)")


if __name__ == "__main__":
    main()
