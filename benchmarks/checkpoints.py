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
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import BertConfig, BertModel, RobertaConfig, RobertaModel

import workbench as wb


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
    labels = ("wb save", "torch.save", "torch.save+fsync", "wb load", "torch.load")
    times: dict[str, list[float]] = {k: [] for k in labels}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(repeats):
            manager = wb.CheckpointManager(Path(tmp) / f"wb{repeat}")
            start = time.perf_counter()
            manager.save(1, model, optimizer, full=True)
            times["wb save"].append(time.perf_counter() - start)
            manager.close()

            for label, durable in (("torch.save", False), ("torch.save+fsync", True)):
                file = Path(tmp) / f"{label}{repeat}.pt"
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
            start = time.perf_counter()
            state = torch.load(Path(tmp) / f"torch.save{repeat}.pt", weights_only=True)
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            times["torch.load"].append(time.perf_counter() - start)
    median = {label: statistics.median(values) for label, values in times.items()}
    for label, value in median.items():
        print(f"   {label:<18} {value * 1000:8.1f} ms (median of {repeats})")
    print(f"   ratio save wb / torch.save       {median['wb save'] / median['torch.save']:.2f}")
    print(f"   ratio save wb / torch.save+fsync {median['wb save'] / median['torch.save+fsync']:.2f}")
    print(f"   ratio load wb / torch.load       {median['wb load'] / median['torch.load']:.2f}"
          "  (wb also checks SHA-256)")


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", choices=["save-load", "size", "training", "listing"], help="run one part")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, workbench {wb.__version__}")
    parts = {"save-load": lambda: save_and_load(args.repeats), "size": size,
             "training": lambda: training_cost(args.steps, every=50),
             "listing": lambda: listing(adapters=100, full=3, repeats=args.repeats)}
    for name, part in parts.items():
        if args.only in (None, name):
            part()


if __name__ == "__main__":
    main()
