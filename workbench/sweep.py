"""Sweeps: one run per combination of variant, rank, learning rate and seed."""

from __future__ import annotations

import itertools
import os
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from .adapters import VARIANTS
from .runs import Run, load_runs
from .tasks import Task


def trial_name(variant: str, rank: int, lr: float, seed: int) -> str:
    """The run directory's name, e.g. ``lora-r8-lr0.003-s0``."""
    return f"{variant}-r{rank}-lr{lr:g}-s{seed}"


def sweep(
    task: str | Task,
    variants: Sequence[str] = VARIANTS,
    ranks: Sequence[int] = (2, 8),
    steps: int = 300,
    out: str | os.PathLike[str] = "runs",
    lrs: Sequence[float] | None = None,
    seeds: Sequence[int] | None = None,
    search: str = "grid",
    trials: int | None = None,
    **settings: Any,
) -> pd.DataFrame:
    """Train one run per trial under ``out`` and return the runs table (``wb.load_runs(out)``).

    Trials are the grid variants x ranks x lrs x seeds (``search="grid"``), or ``trials`` of
    them drawn without replacement with a fixed generator (``search="random"``), so the same
    call always picks the same trials. Run again after an interruption, a sweep skips the
    finished trials and resumes the unfinished one from its newest checkpoint.

    Args:
        lrs: learning rates; default ``[settings.get("lr", 3e-3)]``.
        seeds: default ``[0]``.
        **settings: passed to every ``wb.Run`` (alpha, eval_every, save_every, keep_best, ...).

    Raises:
        ValueError: an unknown variant or search, or ``trials`` missing for a random search.
    """
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variant {unknown[0]!r}; valid variants: {', '.join(VARIANTS)}")
    if search not in ("grid", "random"):
        raise ValueError(f"search must be 'grid' or 'random', not {search!r}")
    lrs = list(lrs) if lrs is not None else [settings.pop("lr", 3e-3)]
    settings.pop("lr", None)
    grid = list(itertools.product(variants, ranks, lrs, seeds if seeds is not None else [0]))
    if search == "random":
        if not isinstance(trials, int) or trials < 1:
            raise ValueError(f"a random search needs trials, an integer >= 1, not {trials!r}")
        grid = random.Random(0).sample(grid, min(trials, len(grid)))
    out = Path(out)
    for variant, rank, lr, seed in grid:
        Run(task, variant, rank, out / trial_name(variant, rank, lr, seed), lr=lr, seed=seed, steps=steps,
            resume=True, **settings).fit()
    return load_runs(out)
