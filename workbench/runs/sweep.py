"""Sweeps: one run per combination of variant, rank, learning rate and seed (a baseline: of learning rate and
seed), in this process or on Ray."""

from __future__ import annotations

import itertools
import os
import random
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pandas as pd

from ..adapters import variant_names
from ..baselines import BASELINES, baseline_settings, check_train, is_baseline
from ..checks import is_integer
from ..tasks import Task, get_task
from .executors import EXECUTORS, Trial, build_trial, run_local, run_on_ray, trial_name
from .search import Space, begin_search, check_pruner, optuna_search, ray_search
from .tables import load_runs

SEARCHES = ("grid", "random", "optuna")


def _choices(name: str, values: Sequence[Any]) -> list[Any]:
    """``values`` as a non-empty list; a string or a single number is refused, not iterated."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise TypeError(f"{name} must be a list, e.g. {name}=[{values!r}], not {values!r}")
    if not values:
        raise ValueError(f"{name} is empty: give at least one")
    return list(values)


def _learning_rates(lrs: Sequence[float] | Mapping[str, Sequence[float]] | None, variants: list[str],
                    default: float) -> dict[str, list[float]]:
    """Each variant's learning rates: ``lrs`` for all, or a mapping's list for each; None: ``[default]``."""
    if lrs is None:
        return {variant: [default] for variant in variants}
    if not isinstance(lrs, Mapping):
        values = _choices("lrs", lrs)
        return {variant: values for variant in variants}
    missing = [variant for variant in variants if variant not in lrs]
    if missing:
        raise ValueError(f"lrs maps variants to their learning rates and has none for {', '.join(missing)}: give "
                         f"every variant of the sweep its list, e.g. lrs={{{missing[0]!r}: [1e-4], ...}}, or one "
                         "list for all (lrs=[3e-3])")
    extra = [name for name in lrs if name not in variants]
    if extra:
        raise ValueError(f"lrs names {', '.join(map(repr, extra))}, which the sweep does not train (its variants: "
                         f"{', '.join(variants)}): leave it out or add it to variants")
    return {variant: _choices(f"lrs[{variant!r}]", lrs[variant]) for variant in variants}


def sweep(
    task: str | Task,
    variants: Sequence[str] | None = None,
    ranks: Sequence[int] = (2, 8),
    steps: int = 300,
    out: str | os.PathLike[str] = "runs",
    lrs: Sequence[float] | Mapping[str, Sequence[float]] | None = None,
    seeds: Sequence[int] | None = None,
    search: str = "grid",
    trials: int | None = None,
    executor: str = "local",
    address: str | None = None,
    cpus_per_trial: int = 1,
    pruner: str | None = "successive-halving",
    **settings: Any,
) -> pd.DataFrame:
    """Train one run per trial under ``out`` and return the runs table (``wb.load_runs(out)``).

    Trials are the grid variants x ranks x lrs x seeds (``search="grid"``), or ``trials`` of
    them drawn without replacement with a fixed generator (``search="random"``), so the same
    call always picks the same trials. Run again after an interruption, a sweep skips the
    finished trials and resumes the unfinished ones from their newest checkpoints.

    ``search="optuna"`` samples ``trials`` configurations of the same space (variant, then rank and
    lr) with Optuna's TPE sampler, seeded by the one seed of ``seeds``, reports every validation of
    the monitor to the trial, and stops a trial its ``pruner`` rejects ("successive-halving", the
    default, "hyperband", "median", or None), where it validated: its run keeps its checkpoints and
    metrics, with status "pruned" (``wb.resume_run`` continues it). The study is ``out/optuna.db``:
    an interrupted search run again continues it. On Ray the same search runs through Ray Tune
    (``workbench.runs.search``)::

        wb.sweep("reviews", ["lora", "dora", "vera"], [2, 8], lrs=[1e-3, 3e-3], search="optuna", trials=8)

    ``variants`` may name the baselines (``wb.BASELINES``: ``"full"`` fine-tuning, ``"head"``
    on a frozen base) beside the adapters; a baseline has no rank, so it is one trial per
    (lr, seed), not per rank. Learning rates may differ by variant, since full fine-tuning wants
    ~1e-4 where LoRA wants ~2e-3::

        wb.sweep("reviews", ["lora", "full", "head"], [8], lrs={"lora": [2e-3], "full": [1e-4], "head": [2e-3]})

    The settings that only adapters take (alpha, targets, the variants' options; and train for
    "full") go to the adapters' trials only, so one sweep compares ``lora`` on chosen targets to
    the baselines.

    With ``executor="ray"`` every trial is a Ray task, and trials run side by side::

        wb.sweep("digits", ["lora", "vera"], [2, 8], out="/shared/runs", executor="ray")  # a local instance
        wb.sweep("digits", out="/shared/runs", executor="ray", address="10.0.0.5:6379")  # a running cluster

    The workers write to ``out`` (made absolute here: on a cluster, a directory every node
    sees), so ``wb.load_runs``, the report and the panels show the trials while they run. A
    trial whose worker dies is retried by Ray from its newest checkpoint (see
    ``workbench.runs.executors``). Ray is imported only here, for ``executor="ray"``.

    Args:
        variants: adapter variants and baselines; default every registered variant (``wb.VARIANTS``,
            read when the sweep starts), no baseline.
        ranks: the adapters' ranks (baselines have none).
        lrs: learning rates, one list for every variant, or a mapping of every variant of the sweep
            to its list (``{"lora": [2e-3], "full": [1e-4, 3e-5]}``); default ``[settings.get("lr", 3e-3)]``.
        seeds: default ``[0]``.
        executor: "local" (default: one trial after another, in this process) or "ray".
        address: Ray only. None starts a local Ray instance for the sweep's duration, limited to
            this machine's cores; ``"HOST:PORT"`` (or ``"auto"``) joins a running cluster. A
            process already connected (``ray.init``) uses its connection.
        cpus_per_trial: Ray only: the CPUs each trial's task reserves and its torch threads.
        pruner: ``search="optuna"`` only: what stops trials early (``workbench.runs.search.PRUNERS``).
        **settings: passed to every ``wb.Run`` (alpha, eval_every, save_every, keep_best,
            callbacks, ...). On Ray, callbacks are copied to the workers and run there.

    Raises:
        ValueError: an unknown variant (the message lists the variants and baselines), search or
            executor, an empty list of variants, ranks, lrs or seeds, a mapping of lrs that misses
            a variant of the sweep or names another, ``trials`` missing for a random search,
            ``out`` a file, or Ray's options with ``executor="local"``; the "head" baseline with no
            train modules (given or the task's default); adapter settings for a sweep of baselines
            only; any setting a ``wb.Run`` refuses (checked on the first trial before it trains).
        TypeError: variants, ranks, lrs or seeds given as one value (``"lora"``) instead of a list.
        workbench.runs.executors.MissingExtraError: ``executor="ray"`` without Ray installed (an ImportError).
    """
    names = variant_names()
    variants = _choices("variants", names if variants is None else variants)
    ranks = _choices("ranks", ranks)
    if lrs is not None and not isinstance(lrs, Mapping):
        lrs = _choices("lrs", lrs)
    seeds = _choices("seeds", seeds) if seeds is not None else None
    unknown = [v for v in variants if v not in names and not is_baseline(v)]
    if unknown:
        raise ValueError(f"unknown variant {unknown[0]!r}; valid variants: {', '.join(names)}; valid baselines: "
                         f"{', '.join(BASELINES)}")
    if search not in SEARCHES:
        raise ValueError(f"unknown search {search!r}; valid searches: {', '.join(SEARCHES)}")
    check_pruner(pruner)
    if search != "optuna" and pruner != "successive-halving" and pruner is not None:
        raise ValueError(f"pruner (--pruner) is for search='optuna' (--search optuna), which reports evaluations to "
                         f"it; a {search} search trains every trial to the end")
    if search == "optuna" and seeds is not None and len(seeds) != 1:
        raise ValueError(f"an optuna search trains each sampled configuration with one seed, which also seeds its "
                         f"sampler: give one seed (seeds=[0]), not {seeds}; search again in another directory for "
                         "another seed")
    if executor not in EXECUTORS:
        raise ValueError(f"unknown executor {executor!r}; valid executors: {', '.join(EXECUTORS)}")
    if executor == "local" and (address is not None or cpus_per_trial != 1):
        raise ValueError("address and cpus_per_trial (--address, --cpus-per-trial) are for executor='ray' "
                         "(--executor ray); the local executor runs trials in this process")
    if not is_integer(cpus_per_trial) or cpus_per_trial < 1:
        raise ValueError(f"cpus_per_trial must be an integer >= 1, not {cpus_per_trial!r}")
    learning_rates = _learning_rates(lrs, variants, settings.pop("lr", 3e-3))
    _check_baselines(task, variants, settings)
    grid = [(variant, rank, lr, seed) for variant in variants
            for rank, lr, seed in itertools.product([None] if is_baseline(variant) else ranks,
                                                    learning_rates[variant], seeds if seeds is not None else [0])]
    if search != "grid" and (not is_integer(trials) or trials < 1):
        raise ValueError(f"a {search} search needs trials (--trials), an integer >= 1, not {trials!r}")
    if search == "random":
        grid = random.Random(0).sample(grid, min(trials, len(grid)))
    root = Path(out).absolute()  # a Ray worker's working directory is not ours
    if root.exists() and not root.is_dir():
        raise ValueError(f"{out} is a file; a sweep writes a directory of runs: give a directory")
    if search == "optuna":
        seed = seeds[0] if seeds is not None else 0
        build_trial(task, Trial(root / "unused", *grid[0][:3], seed), steps, settings).discard()  # refuses bad settings
        space = Space(variants, ranks, learning_rates)
        begin_search(root, {"search": search, "executor": executor, "trials": trials, "steps": steps, "seed": seed,
                            "pruner": pruner, "monitor": settings.get("monitor", "val_loss"), "space": asdict(space)})
        if executor == "ray":
            ray_search(task, space, trials, steps, settings, root, pruner, seed, address, cpus_per_trial)
        else:
            optuna_search(task, space, trials, steps, settings, root, pruner, seed)
        return load_runs(out)
    init = settings.get("init", "default")  # a baseline has no options, so no init
    runs = [Trial(root / trial_name(*trial, init="default" if is_baseline(trial[0]) else init), *trial)
            for trial in grid]
    if executor == "ray":
        run_on_ray(task, runs, steps, settings, address, cpus_per_trial)
    else:
        run_local(task, runs, steps, settings)
    return load_runs(out)


def _check_baselines(task: str | Task, variants: list[str], settings: dict[str, Any]) -> None:
    """Refuse, before any trial trains, what a sweep's baselines would: adapter settings that no trial
    uses, and "head" without train modules."""
    baselines = [variant for variant in variants if is_baseline(variant)]
    if not baselines:
        return
    if len(baselines) == len(variants):
        used = set().union(*(baseline_settings(name, settings) for name in baselines))
        unused = [key for key, value in settings.items() if key not in used and value is not None]
        if unused:
            raise ValueError(f"{', '.join(unused)}: settings of adapters, and the sweep trains only the baselines "
                             f"{', '.join(baselines)}, which take none of them: leave them out")
    if settings.get("train") is None:
        default = (get_task(task) if isinstance(task, str) else task).default_train
        for name in baselines:
            check_train(name, default)
