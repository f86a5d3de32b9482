"""Sweep benchmark: 4 trials one after another in this process against 4 Ray tasks on 2 workers.

Run by hand: ``.venv/bin/python benchmarks/sweep.py`` (about two minutes on 2 CPU cores; needs
``pip install 'adapter-workbench[ray]'``). Measured side by side in this one run and printed as ratios:

1. Ray's start-up, separately: ``ray.init`` of a local instance (2 CPUs), and the first sweep
   on it, whose workers start and import workbench (cold).
2. Then, interleaved ``--repeats`` times, the same 4-trial sweep (lora and vera, two seeds) in
   this process with torch's default threads, in this process with one thread, and on Ray
   (2 workers, one torch thread each, warm), each into a fresh directory; medians. Ray stays
   up, idle, while the in-process sweeps run.

The ratio is bounded by the cores: 2 workers on 2 cores can at best halve the wall time of the
one-thread sweep, less what a trial gains from torch's second thread in process.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

import workbench as wb
from workbench.runs.executors import ray_connection


def _sweep(out: Path, args: argparse.Namespace, **executor: object) -> float:
    start = time.perf_counter()
    table = wb.sweep(args.task, ["lora", "vera"], [8], args.steps, out, lrs=[3e-3], seeds=[0, 1], eval_every=50,
                     save_every=50, progress_bar=False, **executor)
    elapsed = time.perf_counter() - start
    assert (table["status"] == "finished").all() and len(table) == 4, table
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="sequence", choices=sorted(wb.tasks.TASKS), help="(default sequence)")
    parser.add_argument("--steps", type=int, default=300, help="steps per trial (default 300)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats (default 3)")
    args = parser.parse_args()
    print(f"{args.task}, 4 trials of {args.steps} steps; {os.cpu_count()} cores, torch {torch.__version__} "
          f"with {torch.get_num_threads()} threads in process; load average {os.getloadavg()[0]:.2f} at start")
    wb.tasks.get_task(args.task).base_model()  # the cache is filled before anything is timed

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        start = time.perf_counter()
        with ray_connection(num_cpus=2):
            init = time.perf_counter() - start
            cold = _sweep(root / "ray-cold", args, executor="ray")
            local, single, ray = [], [], []
            threads = torch.get_num_threads()
            for repeat in range(args.repeats):
                local.append(_sweep(root / f"local{repeat}", args))
                torch.set_num_threads(1)
                single.append(_sweep(root / f"single{repeat}", args))
                torch.set_num_threads(threads)
                ray.append(_sweep(root / f"ray{repeat}", args, executor="ray"))
            start = time.perf_counter()
        shutdown = time.perf_counter() - start

    in_process, one_thread, on_ray = (statistics.median(times) for times in (local, single, ray))
    print(f"\nRay start-up: ray.init {init:.2f} s, shutdown {shutdown:.2f} s; first sweep (workers start) {cold:.2f} s")
    for label, times in (("in process", local), ("in process, 1 thread", single), ("Ray, 2 workers, warm", ray)):
        print(f"{label:<21}: {statistics.median(times):6.2f} s  (all: {', '.join(f'{t:.2f}' for t in times)})")
    print(f"speed-up, in process / Ray warm: {in_process / on_ray:.2f}")
    print(f"speed-up, in process with 1 thread / Ray warm: {one_thread / on_ray:.2f}")
    print(f"speed-up, in process / (ray.init + cold sweep): {in_process / (init + cold):.2f}")
    print(f"load average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
