"""Checkpoint benchmark: speed against torch.save/torch.load, size, and the cost inside a training loop.

Run by hand: ``.venv/bin/python benchmarks/checkpoints.py`` (about two minutes on 2 CPU cores).
Every comparison is measured side by side in this one run, interleaved, and printed as a ratio.

1. Save and load of the same state (a BERT-style model, 4 layers, hidden 768, vocabulary 8,000,
   every tensor, plus its AdamW state) as this library's checkpoint and with torch.save /
   torch.load(weights_only=True). The library fsyncs and hashes every file; torch.save does
   neither, so a second baseline adds the fsync that durability needs.
2. The size of a lora r=8 checkpoint on the RoBERTa-base layout (query, value) against the raw
   bytes of its trainable tensors (goal: at most 1.01 x + 16 KiB).
3. The wall time of a short lora training loop with no checkpoints, with a checkpoint every 50
   steps written synchronously, and written asynchronously (goal with async: under 5%).
4. Listing: ``CheckpointManager.list()`` shows only checkpoints that verify. The first listing in
   a process hashes every file; later ones re-use the verification while no file's size or
   mtime changed. Both against reading each progress.json alone (what listing did before it
   verified), for many adapter checkpoints and for a few full-model ones.

At real size, not run by default: ``.venv/bin/python benchmarks/checkpoints.py --only real``
(about 40 minutes on an idle machine, nearly all of it part 6's twelve hamlet runs), on the hamlet
task's language model (SmolLM2-135M, 540 MB of float32 tensors, the tied embedding counted once)
with lora r=8 on q_proj and v_proj and its AdamW state:

5. Save (``full=True``) and load against torch.save (and + fsync) / torch.load, as in 1, and the
   size on disk of each.
6. A ``wb.Trainer`` run on hamlet (``--real-steps``, 100 by default) with a checkpoint every 50
   steps (``--real-every``), written synchronously and asynchronously, against the same run
   checkpointing only at the end (validation every 50 steps in all three, on 2 val batches, so
   only the checkpoints differ); for the default adapter + optimizer checkpoints and for
   ``full=True`` ones. The trainer has no ``full`` option, so the full runs give it a manager
   whose saves always write every tensor (``TimedCheckpoints``, which also times the saves).
   Medians of ``--real-repeats`` (2) interleaved repeats. Goal with async: under 5%.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import BertConfig, BertModel, RobertaConfig, RobertaModel

import workbench as wb
from workbench.tasks import Task


def bert(vocab: int = 8000) -> BertModel:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=vocab, hidden_size=768, num_hidden_layers=4, num_attention_heads=12,
                        intermediate_size=3072, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertModel(config)


def _step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, ids: torch.Tensor) -> None:
    loss = model(ids).last_hidden_state.pow(2).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def save_and_load(repeats: int) -> None:
    model = bert()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    _step(model, optimizer, torch.randint(0, 8000, (2, 16)))
    state_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    print(f"\n1. save / load: full model + AdamW state, {state_bytes / 2**20:.0f} MiB of model tensors")
    median, _ = _save_load_times(model, optimizer, repeats)
    _print_save_load(median, repeats)


def _save_load_times(model: nn.Module, optimizer: torch.optim.Optimizer, repeats: int
                     ) -> tuple[dict[str, float], dict[str, int]]:
    """Medians of interleaved wb save (full=True) / load and torch.save (+ fsync) / torch.load of the same state.

    Also the bytes on disk of the wb checkpoint and of the torch.save file. Each repeat's files
    are deleted before the next (a full language model is half a GB each).
    """
    labels = ("wb save", "torch.save", "torch.save+fsync", "wb load", "torch.load")
    times: dict[str, list[float]] = {k: [] for k in labels}
    sizes: dict[str, int] = {}
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as tmp:
            manager = wb.CheckpointManager(Path(tmp) / "wb")
            start = time.perf_counter()
            manager.save(1, model, optimizer, full=True)
            times["wb save"].append(time.perf_counter() - start)
            manager.close()

            for label, durable in (("torch.save", False), ("torch.save+fsync", True)):
                file = Path(tmp) / f"{label}.pt"
                start = time.perf_counter()
                with open(file, "wb") as handle:
                    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": 1}, handle)
                    if durable:
                        handle.flush()
                        os.fsync(handle.fileno())
                times[label].append(time.perf_counter() - start)

            start = time.perf_counter()
            manager.load(1, model, optimizer)
            times["wb load"].append(time.perf_counter() - start)
            plain = Path(tmp) / "torch.save.pt"
            start = time.perf_counter()
            state = torch.load(plain, weights_only=True)
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            times["torch.load"].append(time.perf_counter() - start)
            sizes = {"wb": _bytes_under(manager.path_for(1)), "torch.save": plain.stat().st_size}
    return {label: statistics.median(values) for label, values in times.items()}, sizes


def _print_save_load(median: dict[str, float], repeats: int) -> None:
    for label, value in median.items():
        print(f"   {label:<18} {value * 1000:8.1f} ms (median of {repeats})")
    print(f"   ratio save wb / torch.save       {median['wb save'] / median['torch.save']:.2f}")
    print(f"   ratio save wb / torch.save+fsync {median['wb save'] / median['torch.save+fsync']:.2f}")
    print(f"   ratio load wb / torch.load       {median['wb load'] / median['torch.load']:.2f}"
          "  (wb also checks SHA-256)")


def _bytes_under(directory: Path) -> int:
    return sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())


def size() -> None:
    with torch.device("meta"):
        layout = RobertaModel(RobertaConfig())
    layout = layout.to_empty(device="cpu")
    wb.add_adapters(layout, "lora", 8, targets=["query", "value"])
    raw = sum(p.numel() * p.element_size() for p in layout.parameters() if p.requires_grad)
    with tempfile.TemporaryDirectory() as tmp:
        path = wb.CheckpointManager(tmp).save(0, layout)
        files = {file.name: file.stat().st_size for file in path.iterdir()}
    total = sum(files.values())
    print("\n2. size: lora r=8 on RoBERTa-base (query, value), checkpoint without optimizer")
    parts = ", ".join(f"{k} {v:,}" for k, v in files.items())
    print(f"   trainable tensors {raw:,} bytes; checkpoint {total:,} bytes ({parts})")
    print(f"   ratio {total / raw:.4f}; goal 1.01 x + 16 KiB = {1.01 * raw + 16384:,.0f} bytes: "
          f"{'met' if total <= 1.01 * raw + 16384 else 'missed'}")


def training_cost(steps: int, every: int) -> None:
    ids = torch.randint(0, 8000, (4, 64), generator=torch.Generator().manual_seed(0))
    print(f"\n3. training loop: lora r=8 on query/value, {steps} steps, batch 4 x 64 tokens, checkpoint every {every}")
    for full in (False, True):
        times: dict[str, list[float]] = {"none": [], "sync": [], "async": []}
        for _ in range(2):
            for mode in times:
                model = wb.add_adapters(bert(), "lora", 8, targets=["query", "value"])
                optimizer = wb.make_optimizer(model, lr=1e-3)
                with tempfile.TemporaryDirectory() as tmp:
                    manager = wb.CheckpointManager(tmp, keep_last=2, async_save=(mode == "async"))
                    start = time.perf_counter()
                    for step in range(1, steps + 1):
                        _step(model, optimizer, ids)
                        if mode != "none" and step % every == 0:
                            manager.save(step, model, optimizer, full=full)
                    manager.close()
                    times[mode].append(time.perf_counter() - start)
        base = min(times["none"])
        what = "every tensor (full=True)" if full else "adapter + optimizer"
        sync, async_ = ((min(times[mode]) / base - 1) * 100 for mode in ("sync", "async"))
        print(f"   {what}: no checkpoints {base:.2f} s; sync +{sync:.1f}%; async +{async_:.1f}%")


def _read_progress_only(directory: Path) -> int:
    """The old, unverified listing: parse every step directory's progress.json, nothing else."""
    import json

    return len([json.loads((p / "progress.json").read_text()) for p in sorted(directory.glob("step-*"))])


def listing(adapters: int, full: int, repeats: int) -> None:
    from workbench.checkpoints import manager as manager_module

    print(f"\n4. listing: {adapters} adapter checkpoints (lora r=8, BERT), {full} full-model checkpoints")
    for what, count, model, is_full in (("adapter", adapters, wb.add_adapters(bert(), "lora", 8,
                                                                               targets=["query", "value"]), False),
                                        ("full", full, bert(), True)):
        with tempfile.TemporaryDirectory() as tmp:
            with wb.CheckpointManager(tmp) as writer:
                for step in range(1, count + 1):
                    writer.save(step, model, full=is_full)
            size = sum(f.stat().st_size for f in Path(tmp).rglob("*") if f.is_file())
            times: dict[str, list[float]] = {"progress.json only": [], "first list()": [], "cached list()": []}
            for _ in range(repeats):
                start = time.perf_counter()
                assert _read_progress_only(Path(tmp)) == count
                times["progress.json only"].append(time.perf_counter() - start)
                manager_module._verdicts.clear()  # as in a new process: nothing verified yet
                start = time.perf_counter()
                assert len(wb.CheckpointManager(tmp).list()) == count
                times["first list()"].append(time.perf_counter() - start)
                start = time.perf_counter()
                assert len(wb.CheckpointManager(tmp).list()) == count
                times["cached list()"].append(time.perf_counter() - start)
        median = {k: statistics.median(v) for k, v in times.items()}
        base = median["progress.json only"]
        print(f"   {what} ({size / 2**20:.0f} MiB): " + "; ".join(f"{k} {v * 1000:.1f} ms" for k, v in median.items())
              + f"; first / json-only {median['first list()'] / base:.1f}, cached / json-only "
              f"{median['cached list()'] / base:.2f}")


def hamlet_lora() -> tuple[nn.Module, Task]:
    """Hamlet's SmolLM2-135M with lora r=8 on q_proj and v_proj (its default targets), from seed 0; and the task."""
    task = wb.tasks.hamlet()
    torch.manual_seed(0)
    return wb.add_adapters(task.base_model(), "lora", 8, targets=["q_proj", "v_proj"]), task


def real_save_load(repeats: int) -> None:
    model, task = hamlet_lora()
    optimizer = wb.make_optimizer(model, lr=2e-3)
    inputs, targets = next(iter(task.loaders(0)["train"]))
    task.loss(model(inputs), targets).backward()  # one real step, so AdamW has its state
    optimizer.step()
    state = model.state_dict()
    stored = {t.data_ptr(): t.numel() * t.element_size() for t in state.values()}  # the tied embedding once
    print(f"\n5. real size, save / load: hamlet (SmolLM2-135M), lora r=8 on q_proj/v_proj, full=True + AdamW "
          f"state; {len(state)} tensors, {sum(stored.values()) / 2**20:.0f} MiB of distinct model storage")
    median, sizes = _save_load_times(model, optimizer, repeats)
    _print_save_load(median, repeats)
    print(f"   size on disk: wb {sizes['wb']:,} bytes, torch.save {sizes['torch.save']:,} bytes "
          f"(wb / torch.save {sizes['wb'] / sizes['torch.save']:.4f})")


class TimedCheckpoints(wb.CheckpointManager):
    """A manager that adds up the time the training thread spends in its ``save`` and ``close`` calls.

    With ``full=True`` every save writes every tensor: ``wb.Trainer`` has no option for it.
    """

    def __init__(self, directory: str | os.PathLike[str], full: bool = False, **options: Any) -> None:
        super().__init__(directory, **options)
        self.full, self.blocked = full, 0.0

    def save(self, *args: Any, **kwargs: Any) -> Path:
        start = time.perf_counter()
        try:
            return super().save(*args, **kwargs, full=self.full)
        finally:
            self.blocked += time.perf_counter() - start

    def close(self) -> None:  # with async_save, waits for the last write
        start = time.perf_counter()
        try:
            super().close()
        finally:
            self.blocked += time.perf_counter() - start


def real_training(steps: int, every: int, repeats: int) -> None:
    """wb.Trainer on hamlet: a checkpoint every ``every`` steps, sync and async, against one at the end only.

    Every run validates every ``every`` steps on 2 val batches (a checkpoint step validates
    anyway), so the runs differ only in their checkpoints. One short run first warms the process
    up; each repeat starts its round of modes at the next mode, so no mode is always first.
    Besides the wall time, the time ``fit`` spent blocked in ``save`` and ``close``: with sync
    saves nearly all of the cost, with async ones the copy (the write then competes with
    training for the cores, which only the wall time shows).
    """
    base, task = hamlet_lora()
    modes = ("at the end only", "sync", "async")
    print(f"\n6. real size, training loop: wb.Trainer on hamlet, lora r=8, {steps} steps, batch 8 x 64, "
          f"validation every {every} (2 batches), checkpoint every {every} against one at the end; "
          f"median of {repeats}, interleaved")
    _trainer_run(base, task, 2, every, "at the end only", full=False)
    for full in (False, True):
        runs: dict[str, list[tuple[float, float, int]]] = {mode: [] for mode in modes}
        for repeat in range(repeats):
            for mode in modes[repeat % 3:] + modes[:repeat % 3]:
                runs[mode].append(_trainer_run(base, task, steps, every, mode, full))
        wall = {mode: statistics.median(run[0] for run in values) for mode, values in runs.items()}
        blocked = {mode: statistics.median(run[1] for run in values) for mode, values in runs.items()}
        end = wall["at the end only"]
        what = "every tensor (full=True)" if full else "adapter + optimizer (the default)"
        size, async_size = (runs[mode][-1][2] / 2**20 for mode in ("sync", "async"))
        print(f"   {what}, {size:.1f} MiB a checkpoint (async: {async_size:.1f} MiB): at the end only {end:.1f} s, "
              f"{blocked[modes[0]]:.2f} s in save")
        for mode in ("sync", "async"):
            print(f"     every {every}, {mode:<5}: {wall[mode]:.1f} s ({(wall[mode] / end - 1) * 100:+.1f}%), "
                  f"{blocked[mode]:.2f} s in save ({(blocked[mode] - blocked[modes[0]]) / end * 100:+.1f}% of the run)"
                  + ("  (goal: < 5%)" if mode == "async" else ""))


def _trainer_run(base: nn.Module, task: Task, steps: int, every: int, mode: str, full: bool
                 ) -> tuple[float, float, int]:
    """``fit`` of a copy of ``base`` checkpointing as ``mode`` says: (seconds, seconds in save, last checkpoint B)."""
    with tempfile.TemporaryDirectory() as tmp:
        manager = TimedCheckpoints(tmp, full=full, async_save=mode == "async")
        trainer = wb.Trainer(copy.deepcopy(base), task, lr=2e-3, steps=steps, eval_every=every,
                             save_every=steps if mode == "at the end only" else every, eval_batches=2,
                             checkpoints=manager, progress_bar=False)
        start = time.perf_counter()
        trainer.fit()
        seconds = time.perf_counter() - start
        return seconds, manager.blocked, _bytes_under(manager.path_for(steps))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", choices=["save-load", "size", "training", "listing", "real"],
                        help="run one part; 'real' (hamlet's language model, not run by default) runs 5 and 6")
    parser.add_argument("--real-steps", type=int, default=100, help="steps of each hamlet run in part 6")
    parser.add_argument("--real-every", type=int, default=50, help="checkpoint interval of part 6")
    parser.add_argument("--real-repeats", type=int, default=2, help="interleaved repeats of part 6")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, workbench {wb.__version__}")
    parts = {"save-load": lambda: save_and_load(args.repeats), "size": size,
             "training": lambda: training_cost(args.steps, every=50),
             "listing": lambda: listing(adapters=100, full=3, repeats=args.repeats)}
    if args.only is None:
        for part in parts.values():
            part()
    elif args.only == "real":
        real_save_load(args.repeats)
        real_training(args.real_steps, args.real_every, args.real_repeats)
    else:
        parts[args.only]()


if __name__ == "__main__":
    main()
