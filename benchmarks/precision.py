"""Precision benchmark: bf16 autocast and torch.compile against float32, speed and accuracy, on the real tasks.

Run by hand: ``.venv/bin/python benchmarks/precision.py`` (about 40 minutes on an idle 2-core
machine: hamlet's steps and Trainer runs, and inductor compiling). Shorter: ``--tasks reviews``,
``--setups float32 bf16``, ``--steps 5 --accuracy-steps 0``.

On ``reviews`` (MiniLM-L6, batch 16, each batch padded to its longest text, so lengths vary) and
``hamlet`` (SmolLM2-135M, batch 8 x 64 tokens, always the same shape): lora r=8 on the task's
default targets (and reviews' trained ``classifier`` head), every setup from the same weights:

- ``float32``: eager, the default;
- ``bf16``: eager, forward and loss under ``workbench.trainer.autocast("bf16", "cpu")``, as
  ``wb.Trainer(precision="bf16")`` runs them (parameters, gradients and AdamW state stay float32);
- ``compile``: ``model.compile()`` (torch.compile in place, so state_dict names stay the model's:
  inductor, default mode), float32;
- ``compile-dynamic``: the same with ``dynamic=True`` (reviews only);
- ``compile+bf16``: compiled, under bf16 autocast.

1. Training step: forward + loss + backward + AdamW step on the first training batches, the
   setups interleaved batch by batch (each gets the same batches); medians over the steps after
   ``--warmup``, ratios against float32. For compiled setups, the steps that compiled a graph
   are counted and their time summed (the compile time), and the graphs compiled over all steps:
   more than one is a graph break or a recompile (a new batch length, say). Inductor writes to a
   fresh cache directory (unless ``TORCHINDUCTOR_CACHE_DIR`` is set), so the first compiled
   setup compiles cold; the later ones re-use the kernels they share with it.
2. Evaluation: forward + loss over the first ``--eval-batches`` val batches, eval mode, no_grad,
   interleaved rounds; the first round warms up (and compiles); medians of the rest.
3. Accuracy: a ``wb.Trainer`` run of ``--accuracy-steps`` steps (lr 2e-3, seed 0, validation of the
   whole val split at the end) per setup; val_loss and val_acc (reviews) or val_ppl (hamlet)
   against float32's. The trainer gets the in-place compiled model. Reviews trains with dropout
   (MiniLM's 0.1), and compiled code draws its masks from another generator, so there a compiled
   run differs from the eager one by more than rounding. Also checked: whether a checkpoint of
   the ``torch.compile(model)`` wrapper (names ``_orig_mod.*``) loads into the plain model.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import tempfile
import time
from dataclasses import dataclass, field

import torch
import torch._dynamo.utils
from torch import nn

import workbench as wb
from workbench.tasks import Task, get_task
from workbench.trainer import autocast

SETUPS = ("float32", "bf16", "compile", "compile-dynamic", "compile+bf16")
FIXED_SHAPE = {"hamlet"}  # tasks whose batches are all one shape: dynamic=True is not needed
LR = 2e-3


@dataclass
class Setup:
    """One way of running the model, with its own copy of the model and its optimizer."""

    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    precision: str  # "float32" or "bf16", for ``autocast``
    steps: list[float] = field(default_factory=list)  # seconds per training step
    graphs: int = 0  # graphs compiled by training steps
    compiling: list[float] = field(default_factory=list)  # seconds of the training steps that compiled a graph
    evals: list[float] = field(default_factory=list)  # seconds per evaluation round
    eval_graphs: int = 0


def adapted(task: Task) -> nn.Module:
    """The task's base model with lora r=8 on its default targets, its default modules trained, from seed 0."""
    torch.manual_seed(0)
    return wb.add_adapters(task.base_model(), "lora", 8, targets=task.default_targets, train=task.default_train)


def compiled_copy(base: nn.Module, name: str) -> nn.Module:
    """A copy of ``base``, compiled in place when ``name`` asks (state_dict names stay the model's own)."""
    model = copy.deepcopy(base)
    if name.startswith("compile"):
        model.compile(dynamic=True if name == "compile-dynamic" else None)
    return model


def precision_of(name: str) -> str:
    return "bf16" if name in ("bf16", "compile+bf16") else "float32"


def graphs_compiled() -> int:
    """Graphs dynamo has compiled in this process so far (all setups; read before and after a call)."""
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def first_batches(task: Task, split: str, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first ``count`` batches of ``split`` (the train split cycled when shorter), seed 0."""
    loader = task.loaders(0)[split]
    batches: list[tuple[torch.Tensor, torch.Tensor]] = []
    while len(batches) < count:
        batches += [batch for _, batch in zip(range(count - len(batches)), loader, strict=False)]
        if split != "train":
            break
    return batches


def train_step(setup: Setup, task: Task, inputs: torch.Tensor, targets: torch.Tensor) -> float:
    """Seconds for forward + loss + backward + AdamW step; graphs compiled meanwhile are added to ``setup.graphs``."""
    before, start = graphs_compiled(), time.perf_counter()
    with autocast(setup.precision, "cpu"):
        loss = task.loss(setup.model(inputs), targets)
    setup.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    setup.optimizer.step()
    elapsed, compiled = time.perf_counter() - start, graphs_compiled() - before
    setup.graphs += compiled
    if compiled:
        setup.compiling.append(elapsed)
    return elapsed


@torch.no_grad()
def eval_round(setup: Setup, task: Task, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Seconds for the forward and loss over ``batches`` in eval mode (the training mode is put back)."""
    setup.model.eval()
    before, start = graphs_compiled(), time.perf_counter()
    for inputs, targets in batches:
        with autocast(setup.precision, "cpu"):
            task.loss(setup.model(inputs), targets).item()
    elapsed = time.perf_counter() - start
    setup.eval_graphs += graphs_compiled() - before
    setup.model.train()
    return elapsed


def speed(task: Task, base: nn.Module, names: list[str], steps: int, warmup: int, eval_batches: int,
          eval_repeats: int) -> dict[str, Setup]:
    """Every setup's training-step and evaluation times, interleaved (see the module's docstring, 1 and 2)."""
    setups = {}
    for name in names:
        model = compiled_copy(base, name).train()
        setups[name] = Setup(name, model, wb.make_optimizer(model, lr=LR), precision_of(name))
    for inputs, targets in first_batches(task, "train", warmup + steps):
        for setup in setups.values():
            setup.steps.append(train_step(setup, task, inputs, targets))
    val = first_batches(task, "val", eval_batches)
    for _ in range(eval_repeats + 1):
        for setup in setups.values():
            setup.evals.append(eval_round(setup, task, val))
    return setups


def accuracy(task: Task, base: nn.Module, name: str, steps: int) -> dict[str, float]:
    """The final validation metrics of a seed-0 ``wb.Trainer`` run of ``steps`` steps in setup ``name``."""
    torch._dynamo.reset()  # compiled anew, as in a process of its own (inductor's on-disk cache stays warm)
    trainer = wb.Trainer(compiled_copy(base, name), task, lr=LR, steps=steps, eval_every=steps, save_every=steps,
                         progress_bar=False, precision=precision_of(name), seed=0)
    start = time.perf_counter()
    trainer.fit()
    return trainer.last_metrics | {"seconds": time.perf_counter() - start}


def wrapper_checkpoint(base: nn.Module) -> str:
    """Whether a checkpoint of ``torch.compile(model)`` (lazy: nothing is compiled) loads into the plain model."""
    wrapper = torch.compile(copy.deepcopy(base))
    first = next(name for name, p in wrapper.named_parameters() if p.requires_grad)
    with tempfile.TemporaryDirectory() as tmp:
        with wb.CheckpointManager(tmp) as manager:
            manager.save(0, wrapper)
        try:
            wb.CheckpointManager(tmp).load(0, copy.deepcopy(base))
        except wb.CheckpointError as error:
            why = " ".join(line.strip() for line in str(error).splitlines()[1:2])
            return f"saves names such as {first!r}; loading into the plain model fails ({why} ...)"
    return f"saves names such as {first!r} and loads into the plain model"


def ratio(value: float, reference: float) -> str:
    return f"{value / reference:.2f}x"


def row(task: str, setup: Setup, reference: Setup, warmup: int, metrics: dict[str, float] | None,
        reference_metrics: dict[str, float] | None) -> str:
    step = statistics.median(setup.steps[warmup:])
    base_step = statistics.median(reference.steps[warmup:])
    evals, base_evals = statistics.median(setup.evals[1:]), statistics.median(reference.evals[1:])
    compiled = setup.name.startswith("compile")
    first = f"{len(setup.compiling)}: {sum(setup.compiling):.1f} s" if compiled else ""
    graphs = f"{setup.graphs} / {setup.eval_graphs}" if compiled else ""
    cells = [task, setup.name, f"{step * 1000:.0f}", ratio(step, base_step), first, graphs,
             f"{evals * 1000:.0f}", ratio(evals, base_evals)]
    for key in ("val_loss", "val_ppl" if "val_ppl" in (metrics or {}) else "val_acc"):
        if metrics is None or reference_metrics is None:
            cells.append("")
        else:
            cells.append(f"{key[4:]} {metrics[key]:.4f} ({metrics[key] - reference_metrics[key]:+.4f})")
    return "| " + " | ".join(cells) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=["reviews", "hamlet"], choices=["reviews", "hamlet"])
    parser.add_argument("--setups", nargs="+", default=list(SETUPS), choices=SETUPS,
                        help="float32 is always run: the others are measured against it")
    parser.add_argument("--steps", type=int, default=20, help="timed training steps per setup, after the warm-up")
    parser.add_argument("--warmup", type=int, default=3, help="training steps per setup left out of the medians")
    parser.add_argument("--eval-batches", type=int, default=4)
    parser.add_argument("--eval-repeats", type=int, default=5)
    parser.add_argument("--accuracy-steps", type=int, default=100, help="steps of each Trainer run; 0: none")
    parser.add_argument("--accuracy-setups", nargs="+", default=["float32", "bf16", "compile"], choices=SETUPS)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="inductor-") as cache:
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", cache)
        run(args)


def run(args: argparse.Namespace) -> None:
    # The copies of one model share their forward's code, and dynamo's limit of 8 compiled
    # versions per code object counts them all: 3 compiled setups x (training, eval) pass it.
    torch._dynamo.config.recompile_limit = 64
    print(f"torch {torch.__version__}, {args.threads} threads, workbench {wb.__version__}; lora r=8; "
          f"{args.steps} timed steps after {args.warmup}, {args.eval_batches} val batches x {args.eval_repeats}")
    rows = []
    for task_name in args.tasks:
        task = get_task(task_name)
        base = adapted(task)
        torch._dynamo.reset()
        names = ["float32"] + [n for n in args.setups if n != "float32"
                               and not (n == "compile-dynamic" and task_name in FIXED_SHAPE)]
        lengths = sorted({inputs.shape[-1] for inputs, _ in first_batches(task, "train", args.warmup + args.steps)})
        print(f"\n{task_name}: training batches of {len(lengths)} lengths ({lengths[0]}-{lengths[-1]} tokens)")
        setups = speed(task, base, names, args.steps, args.warmup, args.eval_batches, args.eval_repeats)
        for setup in setups.values():
            print(f"  {setup.name:<16} steps (s): " + " ".join(f"{t:.2f}" for t in setup.steps[:8])
                  + (" ..." if len(setup.steps) > 8 else "") + f"; graphs compiled: training {setup.graphs}, "
                  f"eval {setup.eval_graphs}")
        metrics: dict[str, dict[str, float]] = {}
        if args.accuracy_steps:
            for name in ["float32"] + [n for n in args.accuracy_setups if n != "float32" and n in names]:
                metrics[name] = accuracy(task, base, name, args.accuracy_steps)
                shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics[name].items())
                print(f"  Trainer {args.accuracy_steps} steps, {name}: {shown}")
        print(f"  torch.compile(model) wrapper: {wrapper_checkpoint(base)}")
        rows += [row(task_name, setup, setups["float32"], args.warmup, metrics.get(name), metrics.get("float32"))
                 for name, setup in setups.items()]
    print("\n| task | setup | train step ms | vs float32 | steps that compiled | graphs train / eval | eval ms "
          f"| vs float32 | val loss (vs float32) | val acc or ppl (vs float32) |\n|{' --- |' * 10}")
    print("\n".join(rows))
    print(f"\ntrain step: median of {args.steps} steps after {args.warmup}; eval: median of {args.eval_repeats} "
          f"rounds of {args.eval_batches} val batches after one; accuracy: wb.Trainer, {args.accuracy_steps} steps, "
          f"lr {LR}, seed 0")


if __name__ == "__main__":
    main()
