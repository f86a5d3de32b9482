"""Memory benchmark: peak resident memory of a training step and the bytes autograd saves, wb / peft.

Run by hand: ``.venv/bin/python benchmarks/memory.py`` (about 8 minutes on 2 CPU cores: 15 fresh
processes, each loading its task). While developing: ``--tasks reviews --sides "wb lora" "peft lora"``.

Configurations, each measured in a fresh process of this script (``--child TASK SIDE``) so that
one configuration's peak cannot hide another's:

- tasks: ``reviews`` (MiniLM-L6 classifier, batch 16, adapters on query, key, value, the new head
  ``classifier`` trained in full on both sides: peft's ``modules_to_save``); ``hamlet``
  (SmolLM2-135M, batch 8 x 64 tokens) with its default targets q_proj, v_proj, and ``hamlet-all``
  with every projection (q, k, v, o, gate, up, down);
- sides, all r = 8 and wb's lora defaults (alpha = r, dropout 0): wb lora, wb lora-fa (A frozen;
  its backward keeps A x instead of x), peft lora, peft lora-fa (peft's LoRA with every lora_A set
  to ``requires_grad=False``, the nearest peft has) and peft lorafa-opt (the same frozen A with
  ``peft.optimizers.create_lorafa_optimizer``: it freezes lora_A the same way and keeps AdamW state
  for B only, with a projected gradient for B; it does not change the forward, so its saved bytes
  are peft lora-fa's and only the optimizer differs).

Measured in each process, on the first batch of ``task.loaders(0)["train"]``:

- the resident memory after building task, model and optimizer, just before the steps (VmRSS);
- the peak of ``--steps`` training steps (forward, loss, backward, AdamW step; the same batch
  each time): VmHWM after resetting it to the current size (``workbench.memory.peak_resident``),
  and the step's own increase, peak - before (the AdamW state is made at the first step);
- the bytes autograd saves for backward in one training-mode forward and loss
  (``wb.saved_activations(model)``, which leaves the model's parameters and buffers out), and, as
  a check of that, the bytes of parameter and buffer storages the graph refers to, which it left out.

The children run with glibc's mmap threshold fixed at its initial 128 KiB
(``MALLOC_MMAP_THRESHOLD_``), so every tensor above it is mapped when allocated and unmapped when
freed, and the peak is that of the live tensors. glibc otherwise raises the threshold as large
blocks are freed and keeps later ones in its heap: the same configuration's step increase then
varied by half from run to run (924 and 1420 MiB for hamlet-all wb lora, one step), against under
0.1 MiB with the threshold fixed. ``--malloc default`` measures with the allocator as it is.

Printed: MiB per configuration, the ratios wb / peft for lora (goal: at most 1) and the saved bytes
of lora-fa / lora per task (goal on hamlet-all: at most 0.75), then a markdown table.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
from typing import Any

import torch
from torch import nn

import workbench as wb
from workbench.memory import STATUS_FILE, peak_resident

RANK = 8
ALL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TASKS = ("reviews", "hamlet", "hamlet-all")
SIDES = ("wb lora", "wb lora-fa", "peft lora", "peft lora-fa", "peft lorafa-opt")
LR = 1e-3
MIB = 2**20
MMAP_THRESHOLD = {"MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}  # glibc's initial threshold, kept fixed
FIGURES = ("saved", "before", "peak", "increase")


def task_and_targets(name: str) -> tuple[wb.Task, list[str]]:
    task = wb.tasks.reviews() if name == "reviews" else wb.tasks.hamlet()
    return task, list(ALL_PROJECTIONS if name == "hamlet-all" else task.default_targets)


def adapted(task: wb.Task, targets: list[str], side: str) -> tuple[nn.Module, torch.optim.Optimizer]:
    """The side's adapted model in training mode and its AdamW optimizer."""
    torch.manual_seed(0)
    train = list(task.default_train or [])
    if side.startswith("wb"):
        model = wb.add_adapters(task.base_model(), side.split()[1], RANK, targets=targets, train=train or None)
        return model.train(), wb.make_optimizer(model, LR)
    from peft import LoraConfig, get_peft_model
    from peft.optimizers import create_lorafa_optimizer

    config = LoraConfig(r=RANK, lora_alpha=RANK, lora_dropout=0.0, target_modules=targets,
                        modules_to_save=train or None)
    model = get_peft_model(task.base_model(), config).train()
    if side == "peft lorafa-opt":
        return model, create_lorafa_optimizer(model, r=RANK, lora_alpha=RANK, lr=LR)
    if side == "peft lora-fa":
        for name, param in model.named_parameters():
            if "lora_A" in name:
                param.requires_grad_(False)
    return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)


def resident() -> int:
    """This process's resident set size now (VmRSS), in bytes."""
    with open(STATUS_FILE) as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, task: wb.Task, batch: Any) -> None:
    inputs, targets = batch
    optimizer.zero_grad(set_to_none=True)
    task.loss(model(inputs), targets).backward()
    optimizer.step()


def saved_bytes(model: nn.Module, task: wb.Task, batch: Any, leave_out: bool = True) -> int:
    """Bytes autograd saves in one forward and loss; ``leave_out=False``: parameters and buffers counted too."""
    inputs, targets = batch
    with wb.saved_activations(model if leave_out else None) as saved:
        task.loss(model(inputs), targets)
    return saved.bytes


def child(task_name: str, side: str, steps: int) -> dict[str, int | None]:
    """Build one configuration, then measure it (run in a fresh process)."""
    task, targets = task_and_targets(task_name)
    model, optimizer = adapted(task, targets, side)
    batch = next(iter(task.loaders(0)["train"]))
    gc.collect()
    with peak_resident() as peak:
        before = resident()
        for _ in range(steps):
            train_step(model, optimizer, task, batch)
    optimizer.zero_grad(set_to_none=True)
    saved = saved_bytes(model, task, batch)
    referenced = saved_bytes(model, task, batch, leave_out=False) - saved
    increase = None if peak.bytes is None else peak.bytes - before
    return {"saved": saved, "referenced": referenced, "before": before, "peak": peak.bytes, "increase": increase}


def measure(task_name: str, side: str, steps: int, threads: int, malloc: str) -> dict[str, int | None]:
    """``child`` in a new process of this script; its last stdout line is the JSON result."""
    command = [sys.executable, __file__, "--child", task_name, side, "--steps", str(steps), "--threads", str(threads)]
    env = os.environ | (MMAP_THRESHOLD if malloc == "fixed" else {})
    done = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{task_name} / {side} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def mib(value: float | None) -> str:
    return "n/a" if value is None else f"{value / MIB:.1f}"


def ratio(results: dict[tuple[str, str], dict[str, float | None]], task: str, top: str, bottom: str,
          figure: str) -> str:
    """results[task, top][figure] / results[task, bottom][figure] to 3 places, or "n/a" where not measured."""
    a, b = (results.get((task, side), {}).get(figure) for side in (top, bottom))
    return "n/a" if a is None or not b else f"{a / b:.3f}"


def report(results: dict[tuple[str, str], dict[str, float | None]], tasks: list[str], sides: list[str]) -> None:
    for (task, side), r in results.items():
        print(f"  {task:<10} {side:<15} saved {mib(r['saved']):>7} MiB (parameters left out {mib(r['referenced'])})"
              f"  before {mib(r['before']):>7}  peak {mib(r['peak']):>7}  step +{mib(r['increase'])} MiB")
    for task in tasks:
        print(f"  {task}: wb / peft lora: peak {ratio(results, task, 'wb lora', 'peft lora', 'peak')}, step increase "
              f"{ratio(results, task, 'wb lora', 'peft lora', 'increase')}, saved "
              f"{ratio(results, task, 'wb lora', 'peft lora', 'saved')} (goal <= 1); saved lora-fa / lora: wb "
              f"{ratio(results, task, 'wb lora-fa', 'wb lora', 'saved')}, peft "
              f"{ratio(results, task, 'peft lora-fa', 'peft lora', 'saved')}"
              + (" (goal <= 0.75)" if task == "hamlet-all" else ""))
    print("\n| task | side | saved for backward | resident before the steps | peak | step's increase |")
    print("| --- | --- | --- | --- | --- | --- |")
    for (task, side), r in results.items():
        print(f"| {task} | {side} | {mib(r['saved'])} MiB | {mib(r['before'])} MiB | {mib(r['peak'])} MiB "
              f"| {mib(r['increase'])} MiB |")
    print("\n| task | peak, wb / peft lora | step's increase, wb / peft lora | saved, wb / peft lora "
          "| saved, wb lora-fa / wb lora | saved, peft frozen A / peft lora |")
    print("| --- | --- | --- | --- | --- | --- |")
    for task in tasks:
        cells = [ratio(results, task, "wb lora", "peft lora", f) for f in ("peak", "increase", "saved")]
        cells += [ratio(results, task, f"{s} lora-fa", f"{s} lora", "saved") for s in ("wb", "peft")]
        print(f"| {task} | " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    parser.add_argument("--sides", nargs="+", choices=SIDES, default=list(SIDES))
    parser.add_argument("--steps", type=int, default=3, help="training steps per measurement")
    parser.add_argument("--repeats", type=int, default=1, help="interleaved rounds of every configuration; medians")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--malloc", choices=("fixed", "default"), default="fixed",
                        help="fixed: the children's glibc mmap threshold pinned at 128 KiB; default: as it is")
    parser.add_argument("--child", nargs=2, metavar=("TASK", "SIDE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(child(*args.child, args.steps)))
        return
    import peft
    import transformers

    print(f"torch {torch.__version__}, peft {peft.__version__}, transformers {transformers.__version__}, "
          f"{args.threads} threads; r={RANK}, alpha={RANK}, dropout 0; {args.steps} AdamW steps on the first training "
          f"batch, each configuration in its own process ({args.malloc} mmap threshold), median of {args.repeats}")
    runs: dict[tuple[str, str], list[dict[str, int | None]]] = {(t, s): [] for t in args.tasks for s in args.sides}
    for _ in range(args.repeats):
        for task, side in runs:
            runs[task, side].append(measure(task, side, args.steps, args.threads, args.malloc))
    results = {key: {figure: None if any(v[figure] is None for v in values)
                     else statistics.median(v[figure] for v in values) for figure in (*FIGURES, "referenced")}
               for key, values in runs.items()}
    report(results, args.tasks, args.sides)


if __name__ == "__main__":
    main()
