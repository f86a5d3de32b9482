"""Training throughput: wb.Trainer against peft + transformers' Trainer on ``reviews``, in one run.

Run by hand: ``.venv/bin/python benchmarks/hf_trainer.py`` (about 25 min on 2 idle CPU cores with the
defaults); ``--profile`` adds a torch.profiler table of a few wb training steps. While developing, use
``--steps 10 --repeats 1``.

Both sides train the same model on the same data with the same settings: the ``reviews`` task's
TextClassifier (MiniLM-L6 and a new linear head ``classifier`` on its mean-pooled output), LoRA r = 8,
alpha 8, dropout 0 (wb's defaults) on query, key and value, the head trained in full (peft's
``modules_to_save``), batch 16, texts of at most 80 tokens padded to each batch's longest, AdamW lr 2e-3
with torch's defaults (betas 0.9, 0.999, eps 1e-8, weight decay 0.01), a constant lr, no clipping, the
same number of steps, and validation every ``--eval-every`` steps on the whole val split, 64 texts at a
time. Both heads start from the same seed and peft's LoRA factors are set to wb's starting values.
What stays different, by design: the data order (wb groups training batches by length; HF is measured
with its default random batches and with its ``group_by_length`` sampler), HF's AdamW implementation
(``adamw_torch_fused``, its default) and HF leaving biases out of weight decay (here only the head's).

Measured, the sides interleaved (wb, HF, HF grouped, matmul, wb, ...), medians over ``--repeats``:

- the wall time of the whole fit (``fit()`` / ``train()``, validation included; HF's also holds what
  ``train()`` sets up, the optimizer and accelerate, which wb's Trainer does when it is made);
- training only: the time from the end of step 1 to the end of the last step, minus the validations
  in between, from each trainer's step-end and evaluation callbacks; steps/s and real (non-pad)
  tokens/s over those steps, and the ratios wb / HF and wb / HF grouped;
- the useful FLOP rate: FLOPs of forward, loss and backward (``torch.utils.flop_counter``) summed over
  the timed steps' batches, divided by the training time. Frozen weights have ``requires_grad=False``,
  so autograd computes no gradient for them and the counter counts none; the optimizer step and
  elementwise ops are not counted. For a fixed batch B the count is exactly a + b T + c T^2 in the
  padded length T (linear layers, attention), so it is counted at three lengths per B and interpolated.
  Reported as a fraction of this machine's dense float32 matmul rate (``torch.mm`` of two
  ``--mm-size`` square matrices, timed in every round).

Tokens per step are counted from each side's own training loader in a separate pass: wb's
``task.loaders(seed)["train"]`` and HF's ``trainer.get_train_dataloader()`` after ``set_seed(seed)``,
which give the batches the fits draw. Final val loss and accuracy are printed, not compared: the two
sides see the data in different orders.
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import peft
import torch
import transformers
from peft import LoraConfig, get_peft_model
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from transformers import PrinterCallback, TrainerCallback, TrainingArguments

import workbench as wb

LR, RANK, EVAL_BATCH = 2e-3, 8, 64
SIDES = ("wb", "HF", "HF grouped")
BUCKETS = {  # profile buckets by op name, first match wins; ops under Optimizer.step count as optimizer
    "attention": ("scaled_dot_product", "softmax"),
    "matmul": ("mm", "matmul", "linear"),
    "elementwise/norm": ("layer_norm", "gelu", "dropout", "bernoulli", "add", "mul", "div", "sub", "sum", "copy"),
    "data loading": ("dataloader", "collate", "pad_sequence"),
}


class Clock(wb.Callback, TrainerCallback):
    """Training time from step-end and evaluation callbacks: a ``wb.Callback`` and a transformers ``TrainerCallback``.

    Sums the time from each step's end to the next's, or from the end of a validation in between.
    The two trainers call some hooks of the same name with different arguments: those take any.
    """

    def __init__(self) -> None:
        self.seconds, self.last = 0.0, None

    def _mark(self, step_ended: bool) -> None:
        now = time.perf_counter()
        if step_ended and self.last is not None:
            self.seconds += now - self.last
        if step_ended or self.last is not None:
            self.last = now

    def on_step(self, *_: Any, **__: Any) -> None:  # wb's hook; transformers' is on_step_end
        self._mark(True)

    on_step_end = on_step

    def on_evaluate(self, *_: Any, **__: Any) -> None:
        self._mark(False)

    def on_save(self, *_: Any, **__: Any) -> None:
        pass


class HFClassifier(nn.Module):
    """The task's model with the interface transformers' Trainer expects: keyword inputs -> {"loss", "logits"}."""

    def __init__(self, model: nn.Module, loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.model, self.loss = model, loss

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """ids (B, T) -> logits (B, C); the TextClassifier masks the pad ids itself, so ``attention_mask`` is unused."""
        logits = self.model(input_ids)
        return {"logits": logits} if labels is None else {"loss": self.loss(logits, labels), "logits": logits}


def dict_items(items: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
    """A task's (ids, label) items as transformers' dict items (a list is a map-style dataset)."""
    return [{"input_ids": ids, "labels": label} for ids, label in items]


def load() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def wb_model(task: wb.tasks.Task, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return wb.add_adapters(task.base_model(), "lora", RANK, targets=task.default_targets, train=task.default_train)


def hf_model(task: wb.tasks.Task, seed: int) -> nn.Module:
    """peft's LoRA with wb's defaults on the same base, head and starting factors as ``wb_model(task, seed)``."""
    start = wb_model(task, seed)
    torch.manual_seed(seed)
    config = LoraConfig(r=RANK, lora_alpha=RANK, lora_dropout=0.0, target_modules=list(task.default_targets),
                        modules_to_save=list(task.default_train))
    model = get_peft_model(HFClassifier(task.base_model(), task.loss), config)
    params = dict(model.named_parameters())
    with torch.no_grad():  # peft draws A from the global RNG in another order than wb: start both alike
        for name, value in start.named_parameters():
            if name.endswith((".lora_A", ".lora_B")):
                params[f"base_model.model.model.{name}.default.weight"].copy_(value)
    return model


def wb_trainer(task: wb.tasks.Task, args: argparse.Namespace, clock: Clock) -> wb.Trainer:
    return wb.Trainer(wb_model(task, args.seed), task, lr=LR, steps=args.steps, eval_every=args.eval_every,
                      save_every=args.steps, progress_bar=False, seed=args.seed, callbacks=[clock])


def hf_trainer(task: wb.tasks.Task, args: argparse.Namespace, grouped: bool, clock: Clock, out: str
               ) -> transformers.Trainer:
    data = task.datasets(args.seed)

    def collate(features: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        ids, labels = task.collate([(f["input_ids"], f["labels"]) for f in features])
        return {"input_ids": ids, "labels": labels}

    def accuracy(prediction: transformers.EvalPrediction) -> dict[str, float]:
        return {"accuracy": float((prediction.predictions.argmax(-1) == prediction.label_ids).mean())}

    settings = TrainingArguments(
        output_dir=out, max_steps=args.steps, per_device_train_batch_size=task.batch_size,
        per_device_eval_batch_size=EVAL_BATCH, learning_rate=LR, weight_decay=0.01, lr_scheduler_type="constant",
        warmup_steps=0, max_grad_norm=0.0, eval_strategy="steps", eval_steps=args.eval_every, save_strategy="no",
        logging_strategy="no", report_to="none", dataloader_num_workers=0, use_cpu=True, disable_tqdm=True,
        seed=args.seed, remove_unused_columns=False, train_sampling_strategy="group_by_length" if grouped else "random")
    trainer = transformers.Trainer(model=hf_model(task, args.seed), args=settings, data_collator=collate,
                                   train_dataset=dict_items(data["train"]), eval_dataset=dict_items(data["val"]),
                                   compute_metrics=accuracy, callbacks=[clock])
    trainer.remove_callback(PrinterCallback)  # with tqdm off it prints every evaluation
    return trainer


def batch_shapes(loader: Iterable[Any], steps: int, pad_id: int) -> list[tuple[int, int, int]]:
    """(B, T, real tokens) of the first ``steps`` training batches, epoch after epoch as a trainer draws them."""
    shapes: list[tuple[int, int, int]] = []
    while len(shapes) < steps:
        for batch in itertools.islice(loader, steps - len(shapes)):
            ids = batch["input_ids"] if isinstance(batch, dict) else batch[0]
            shapes.append((*ids.shape, int((ids != pad_id).sum())))
    return shapes


class StepFlops:
    """FLOPs of one training step (forward, loss, backward) of ``model`` on a (B, T) batch."""

    def __init__(self, model: nn.Module, loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
        self.model, self.loss, self.fits = model.train(), loss, {}

    def count(self, batch: int, length: int) -> int:
        ids = torch.full((batch, length), 1000)  # an ordinary token: the count depends on shapes only
        with FlopCounterMode(display=False) as counter:
            self.loss(self.model(ids), torch.zeros(batch, dtype=torch.long)).backward()
        self.model.zero_grad(set_to_none=True)
        return counter.get_total_flops()

    def __call__(self, batch: int, length: int) -> float:
        """a + b T + c T^2, exact for this B from counts at three lengths."""
        if batch not in self.fits:
            lengths = (8, 40, 80)
            self.fits[batch] = np.polyfit(lengths, [self.count(batch, t) for t in lengths], 2)
        return float(np.polyval(self.fits[batch], length))


def matmul_rate(size: int, repeats: int = 3) -> float:
    """Dense float32 FLOP/s of ``torch.mm`` on two (size, size) matrices: 2 size^3 over the median time."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - start)
    return 2 * size**3 / statistics.median(times)


def bucket(event: Any) -> str:
    """The profile bucket of a ``FunctionEvent``: optimizer if under ``Optimizer.step``, else by its name."""
    node = event
    while node is not None:
        if node.name.startswith("Optimizer."):
            return "optimizer"
        node = node.cpu_parent
    name = event.name.lower()
    return next((label for label, keys in BUCKETS.items() if any(k in name for k in keys)), "other")


def profile_wb(task: wb.tasks.Task, seed: int, warmup: int = 3, steps: int = 5) -> None:
    """torch.profiler over ``steps`` wb training steps after ``warmup``: the top ops, each bucket's self CPU share."""
    profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])

    class Window(wb.Callback):
        def on_step(self, trainer: wb.Trainer, loss: float) -> None:
            if trainer.step in (warmup, warmup + steps):
                (profiler.start if trainer.step == warmup else profiler.stop)()

    wb.Trainer(wb_model(task, seed), task, lr=LR, steps=warmup + steps, eval_every=warmup + steps, eval_batches=1,
               save_every=warmup + steps, progress_bar=False, seed=seed, callbacks=[Window()]).fit()
    print(f"\nprofile of wb training steps {warmup + 1}-{warmup + steps}:")
    print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
    shares = dict.fromkeys([*BUCKETS, "optimizer", "other"], 0.0)
    for event in profiler.events():
        shares[bucket(event)] += event.self_cpu_time_total
    total = sum(shares.values())
    print("  self CPU time: " + ", ".join(f"{k} {v / total:.1%}" for k, v in shares.items()))


def run(side: str, task: wb.tasks.Task, args: argparse.Namespace) -> tuple[float, Clock, dict[str, float]]:
    """One fit of ``side``: (wall seconds, its clock, final val metrics {"loss", "acc"})."""
    clock = Clock()
    with tempfile.TemporaryDirectory() as out:
        trainer = (wb_trainer(task, args, clock) if side == "wb" else
                   hf_trainer(task, args, side == "HF grouped", clock, out))
        start = time.perf_counter()
        trainer.fit() if side == "wb" else trainer.train()
        wall = time.perf_counter() - start
    if side == "wb":
        return wall, clock, {"loss": trainer.last_metrics["val_loss"], "acc": trainer.last_metrics["val_acc"]}
    last = [entry for entry in trainer.state.log_history if "eval_loss" in entry][-1]
    return wall, clock, {"loss": last["eval_loss"], "acc": last["eval_accuracy"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--eval-every", type=int, default=50, help="at most --steps, and dividing it")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--mm-size", type=int, default=4096)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    args.eval_every = min(args.eval_every, args.steps)
    if args.steps % args.eval_every:  # wb also validates after the last step; HF only every eval_steps
        parser.error(f"--eval-every {args.eval_every} must divide --steps {args.steps}, so both validate alike")
    transformers.logging.set_verbosity_error()
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}; "
          f"{torch.get_num_threads()} threads, {load()}")
    task = wb.tasks.reviews()
    pad = task.tokenizer.pad_token_id
    shapes = {"wb": batch_shapes(task.loaders(args.seed)["train"], args.steps, pad)}
    for side in SIDES[1:]:
        with tempfile.TemporaryDirectory() as out:
            trainer = hf_trainer(task, args, side == "HF grouped", Clock(), out)
            transformers.set_seed(args.seed)  # as train() does before it draws its loader
            shapes[side] = batch_shapes(trainer.get_train_dataloader(), args.steps, pad)
    flops = StepFlops(wb_model(task, args.seed), task.loss)
    typical = (task.batch_size, int(statistics.median(t for _, t, _ in shapes["wb"])))
    print(f"reviews, lora r={RANK} on {', '.join(task.default_targets)}, batch {task.batch_size}, {args.steps} steps, "
          f"validation every {args.eval_every}; one wb step at {typical}: {flops.count(*typical) / 1e9:.2f} GFLOP "
          f"counted, {flops(*typical) / 1e9:.2f} interpolated")

    walls: dict[str, list[float]] = {side: [] for side in SIDES}
    trains: dict[str, list[float]] = {side: [] for side in SIDES}
    rates, metrics = [], {}
    for _ in range(args.repeats):
        for side in SIDES:
            wall, clock, metrics[side] = run(side, task, args)
            walls[side].append(wall)
            trains[side].append(clock.seconds)
        rates.append(matmul_rate(args.mm_size))
    mm = statistics.median(rates)
    rows: dict[str, dict[str, float]] = {}
    for side in SIDES:
        timed = shapes[side][1:]  # the clock times steps 2..S
        wall, train = statistics.median(walls[side]), statistics.median(trains[side])
        rows[side] = {
            "steps/s, fit with validation": args.steps / wall,
            "real tokens/s, fit with validation": sum(r for _, _, r in shapes[side]) / wall,
            "steps/s, training only": len(timed) / train,
            "real tokens/s, training only": sum(r for _, _, r in timed) / train,
            "real tokens / step": statistics.mean(r for _, _, r in shapes[side]),
            "padded tokens / step": statistics.mean(b * t for b, t, _ in shapes[side]),
            "useful GFLOP/s": sum(flops(b, t) for b, t, _ in timed) / train / 1e9,
            "fraction of matmul rate": sum(flops(b, t) for b, t, _ in timed) / train / mm,
            "final val loss": metrics[side]["loss"],
            "final val accuracy": metrics[side]["acc"],
        }
    print(f"matmul {args.mm_size}^2 float32: {mm / 1e9:.1f} GFLOP/s (median of {len(rates)} rounds); "
          f"medians of {args.repeats}; {torch.get_num_threads()} threads, {load()}\n")
    print("| measure | wb | HF | HF grouped | wb / HF | wb / HF grouped | goal |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    goals = {measure: "wb / HF >= 1.2" for measure in rows["wb"] if "/s," in measure}
    goals["fraction of matmul rate"] = "wb >= 0.5"
    for measure in rows["wb"]:
        values = [rows[side][measure] for side in SIDES]
        ratios = [values[0] / v for v in values[1:]] if measure.split(",")[0] in ("steps/s", "real tokens/s") else []
        cells = [f"{v:.4g}" for v in values] + ([f"{r:.3f}" for r in ratios] or ["", ""])
        print(f"| {measure} | {' | '.join(cells)} | {goals.get(measure, '')} |")
    if args.profile:
        profile_wb(task, args.seed)


if __name__ == "__main__":
    main()
