"""Data-parallel benchmark: wb.Trainer on 2 gloo processes against one process, same global batch.

Run by hand: ``.venv/bin/python benchmarks/distributed.py`` (about a minute on 2 CPU cores).

Every configuration trains the same LoRA model of a built-in task for the same steps on the
same global batch (the task's, 64): one process with 2 threads and with 1 thread, and
``DistributedDataParallel`` over 2 processes of 1 thread each (gloo, spawned here, each on half
of every batch). Validation is off, so only training steps are timed (inside the processes,
after start-up). Runs are interleaved and the best of several repeats is kept for each, so
background noise hits all alike. On 2 cores the gain is bounded by 2x, less the all-reduces of
the gradients and of the loss per step, and by how well one process already uses 2 threads.
"""

from __future__ import annotations

import argparse
import os
import socket
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import workbench as wb
from workbench.tasks import get_task
from workbench.trainer import Trainer


def train(task_name: str, steps: int, group: dist.ProcessGroup | None = None) -> float:
    """Seconds per training step of a LoRA r=8 run, validation off."""
    task = get_task(task_name)
    torch.manual_seed(0)
    model = wb.add_adapters(task.base_model(), "lora", 8, targets=task.default_targets)
    trainer = Trainer(model, task, lr=3e-3, steps=steps, eval_every=10 * steps, save_every=10 * steps,
                      progress_bar=False, process_group=group)
    trainer.evaluate = lambda split="val": {}  # time training only (every rank skips it alike)
    if group is not None:
        dist.barrier(group=group)
    start = time.perf_counter()
    trainer.fit()
    return (time.perf_counter() - start) / steps


def _worker(rank: int, port: int, task_name: str, steps: int, results: mp.Queue) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        seconds = train(task_name, steps, dist.group.WORLD)
        if rank == 0:
            results.put(seconds)
    finally:
        dist.destroy_process_group()


def data_parallel(task_name: str, steps: int) -> float:
    """Seconds per step of the same run on 2 gloo processes (rank 0's time; the ranks step together)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    context = mp.get_context("spawn")
    results = context.Queue()
    mp.start_processes(_worker, args=(port, task_name, steps, results), nprocs=2, start_method="spawn")
    return results.get()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="digits,sequence")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    for task_name in args.tasks.split(","):
        get_task(task_name).base_model()  # pre-train and cache the base outside the timings
        times: dict[str, list[float]] = {"1 process, 2 threads": [], "1 process, 1 thread": [],
                                         "DDP 2 processes x 1 thread": []}
        for _ in range(args.repeats):
            for threads in (2, 1):
                torch.set_num_threads(threads)
                times[f"1 process, {threads} thread{'s' if threads > 1 else ''}"].append(train(task_name, args.steps))
            times["DDP 2 processes x 1 thread"].append(data_parallel(task_name, args.steps))
        best = {label: min(values) for label, values in times.items()}
        print(f"task {task_name}, lora r=8, global batch {get_task(task_name).batch_size}, {args.steps} steps, "
              f"best of {args.repeats}")
        for label, seconds in best.items():
            print(f"  {label:<28} {seconds * 1e3:7.2f} ms/step  {1 / seconds:7.1f} steps/s")
        ddp = best["DDP 2 processes x 1 thread"]
        print(f"  DDP speed-up over 1 process: x{best['1 process, 2 threads'] / ddp:.2f} (2 threads), "
              f"x{best['1 process, 1 thread'] / ddp:.2f} (1 thread)")


if __name__ == "__main__":
    main()
