"""Search benchmark: a pruned Optuna search against the full grid of the same space, on reviews, over seeds.

Run by hand: ``.venv/bin/python benchmarks/search.py`` (about 25 minutes on 2 CPU cores, most of it the
grids); while developing, ``--seeds 0 --steps 40``.

The space: lora, dora and vera, ranks 2 and 8, learning rates 1e-3 and 3e-3 (12 configurations),
``--steps`` optimizer steps each, validated (and checkpointed) every ``--eval-every`` steps on the
first ``--eval-batches`` validation batches. For each seed, side by side in this one run:

- the grid: every configuration to the end (``wb.sweep``, on Ray: one run per core);
- the search: ``--trials`` trials sampled by Optuna's TPE, seeded by the same seed, with successive
  halving (a third of the trials go on at each rung), one after another in this process. The grid
  runs two trials side by side and the search one, so they are compared by their work (seconds
  summed over their runs) and optimizer steps, not by elapsed time.

Printed per seed and as a mean with a 95% t interval over seeds: the optimizer steps each trained, the
work each did (seconds summed over its runs), the best validation loss each found and whether the
search found the grid's best configuration; then a markdown table for benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import pandas as pd

import workbench as wb
from workbench.runs.search import read_search, search_compute
from workbench.stats import interval

SPACE = {"variants": ["lora", "dora", "vera"], "ranks": [2, 8], "lrs": [1e-3, 3e-3]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=lambda text: [int(s) for s in text.split(",")], default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--eval-every", type=int, default=20)
    parser.add_argument("--eval-batches", type=int, default=8)
    parser.add_argument("--trials", type=int, default=6)
    parser.add_argument("--out", type=Path, help="where the runs go (default: a temporary directory)")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="search-bench-"))
    settings = {"steps": args.steps, "eval_every": args.eval_every, "save_every": args.eval_every,
                "eval_batches": args.eval_batches, "progress_bar": False}
    print(f"reviews; space {SPACE}; {args.steps} steps, validation every {args.eval_every} on "
          f"{args.eval_batches} batches; seeds {args.seeds}; {args.trials} trials; load {os.getloadavg()[0]:.2f}; "
          f"runs in {out}", flush=True)
    wb.tasks.get_task("reviews")  # loaded and tokenized once, before any clock starts
    rows = []
    for seed in args.seeds:
        clock = time.perf_counter()
        grid = wb.sweep("reviews", **SPACE, seeds=[seed], out=out / f"grid-s{seed}", executor="ray", **settings)
        grid_elapsed = time.perf_counter() - clock
        clock = time.perf_counter()
        searched = wb.sweep("reviews", **SPACE, seeds=[seed], out=out / f"search-s{seed}", search="optuna",
                            trials=args.trials, pruner="successive-halving", **settings)
        search_elapsed = time.perf_counter() - clock
        compute = search_compute(searched, read_search(out / f"search-s{seed}"), grid)
        rows.append({"seed": seed, **compute, "grid_elapsed": grid_elapsed, "search_elapsed": search_elapsed,
                     "load": os.getloadavg()[0]})
        print(f"seed {seed}: steps {compute['steps']} of the grid's {compute['grid_steps']} "
              f"({compute['steps'] / compute['grid_steps']:.2f}); work {compute['wall_time']:.0f} s against "
              f"{compute['grid_wall_time']:.0f} s ({compute['wall_time'] / compute['grid_wall_time']:.2f}); "
              f"best val_loss {compute['best_value']:.4f} ({compute['best_run']}) against the grid's "
              f"{compute['grid_best_value']:.4f} ({compute['grid_best_run']}); {compute['pruned']} pruned; "
              f"load {rows[-1]['load']:.2f}", flush=True)
    table = pd.DataFrame(rows)
    table["step_ratio"] = table["steps"] / table["grid_steps"]
    table["work_ratio"] = table["wall_time"] / table["grid_wall_time"]
    table["best_gap"] = table["best_value"] - table["grid_best_value"]
    print("\nmean over seeds [95% t interval]:")
    for column, about in (("step_ratio", "optimizer steps, search / grid"), ("work_ratio", "work, search / grid"),
                          ("best_value", "best val_loss found by the search"),
                          ("grid_best_value", "best val_loss of the grid"),
                          ("best_gap", "search's best - grid's best")):
        mean, _, low, high = interval(table[column].astype(float))
        print(f"  {about}: {mean:.4g} [{low:.4g}, {high:.4g}]")
    print(f"  the search found the grid's best configuration in {int(table['same_best'].sum())} of {len(table)} seeds")
    print("\n| seed | steps (search / grid) | work s (search / grid) | best val_loss (search / grid) | same best | "
          "pruned |\n| --- | --- | --- | --- | --- | --- |")
    for row in table.itertuples():
        print(f"| {row.seed} | {row.steps} / {row.grid_steps} ({row.step_ratio:.2f}) | {row.wall_time:.0f} / "
              f"{row.grid_wall_time:.0f} ({row.work_ratio:.2f}) | {row.best_value:.4f} / {row.grid_best_value:.4f} | "
              f"{'yes' if row.same_best else 'no'} | {row.pruned} |")


if __name__ == "__main__":
    main()
