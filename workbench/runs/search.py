"""A search that prunes: Optuna samples the trials, a pruner stops the clearly worse ones at their evaluations.

``wb.sweep(..., search="optuna", trials=N, pruner=...)`` lands here. Each trial is an ordinary run
directory (``trial_name``); a pruned one keeps its checkpoints and metrics, with status "pruned"
and the step it stopped at, and ``wb.resume_run`` continues it later, exactly.

In this process (``executor="local"``) the study lives in ``<out>/optuna.db`` (SQLite). Run again
after an interruption, the search continues the same study: a trial the interruption cut off is
enqueued again with its parameters, so its run resumes from its newest checkpoint, and each
trial's sampler is seeded from the seed and the number of trials done, so the trials sampled after
an interruption are those an uninterrupted search would have sampled.

On Ray (``executor="ray"``) Ray Tune runs the same search: Optuna's sampler through Tune's
``OptunaSearch``, and Tune's own early-stopping schedulers (ASHA for "successive-halving", the
asynchronous HyperBand, the median stopping rule); an interrupted search is restored with
``Tuner.restore``, and a trial Ray restarts resumes from its run's newest checkpoint.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pandas as pd

from .. import metrics_log
from ..baselines import is_baseline
from ..checkpoints.files import write_json
from ..selection import best_index, resolve_mode
from ..tasks import Task
from ..trainer import Callback, Trainer
from .executors import MissingExtraError, Trial, build_trial, ray_connection, trial_name
from .layout import PRUNED, metrics_path, read_record
from .tables import load_runs

PRUNERS = ("successive-halving", "hyperband", "median", None)
SEARCH_FILE = "search.json"  # what the search searches (``begin_search``): its space, budget, seed, pruner, monitor
STUDY_FILE = "optuna.db"
STUDY_NAME = "workbench"
TUNE_DIR = "tune"  # Ray Tune's experiment state, beside the runs
REDUCTION_FACTOR = 3  # successive halving and HyperBand keep the best third at each rung


@dataclass(frozen=True)
class Space:
    """What a search samples: a variant, then its rank (adapters only) and learning rate, from these lists."""

    variants: list[str]
    ranks: list[int]
    lrs: dict[str, list[float]]

    def lr_name(self, variant: str) -> str:
        """The learning rate's parameter name: "lr" when every variant has the same list, else "lr[<variant>]"
        (a categorical parameter keeps one list of choices)."""
        shared = all(values == self.lrs[self.variants[0]] for values in self.lrs.values())
        return "lr" if shared else f"lr[{variant}]"

    def suggest(self, trial: Any) -> tuple[str, int | None, float]:
        """(variant, rank, lr) drawn from an Optuna trial (define-by-run)."""
        variant = trial.suggest_categorical("variant", self.variants)
        rank = None if is_baseline(variant) else trial.suggest_categorical("rank", self.ranks)
        return variant, rank, trial.suggest_categorical(self.lr_name(variant), self.lrs[variant])

    def size(self) -> int:
        """Configurations in the space: what the full grid trains."""
        return sum((1 if is_baseline(v) else len(self.ranks)) * len(self.lrs[v]) for v in self.variants)


def check_pruner(pruner: object) -> None:
    """Refuse a pruner that is not one of ``PRUNERS``, naming them."""
    if pruner not in PRUNERS:
        raise ValueError(f"unknown pruner {pruner!r}; valid pruners: "
                         + ", ".join("None" if p is None else repr(p) for p in PRUNERS))


def import_optuna() -> ModuleType:
    try:
        import optuna
    except ImportError as error:  # a dependency of the package: only a broken install lacks it
        raise MissingExtraError("search='optuna' needs Optuna: pip install optuna") from error
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def _pruner(optuna: ModuleType, name: str | None, eval_every: int, steps: int) -> Any:
    """Optuna's pruner for ``name``; rungs count optimizer steps, the first at the first evaluation."""
    if name == "successive-halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=eval_every, reduction_factor=REDUCTION_FACTOR)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=eval_every, max_resource=steps,
                                              reduction_factor=REDUCTION_FACTOR)
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=2)
    return optuna.pruners.NopPruner()


def _history(path: Path, monitor: str) -> list[tuple[int, float]]:
    """(step, value) of every logged validation of ``monitor`` (the metric's name with its split)."""
    metric = monitor.removeprefix("val_")
    return [(entry["step"], entry["value"]) for entry in metrics_log.read(metrics_path(path))
            if entry["split"] == "val" and entry["metric"] == metric and entry["value"] is not None]


class _Reporter(Callback):
    """Reports each validation of the monitor to the Optuna trial, and prunes the run when its pruner says so."""

    def __init__(self, trial: Any, monitor: str, pruner: str | None) -> None:
        self.trial, self.monitor, self.pruner = trial, monitor, pruner
        self.reported: set[int] = set()
        self.run: Any = None  # the Run, set once it is built

    def report(self, step: int, value: float) -> bool:
        """Report ``value`` at ``step`` (once per step); whether the pruner now stops the trial."""
        if step not in self.reported:
            self.reported.add(step)
            self.trial.report(value, step)
        return self.trial.should_prune()

    def why(self, step: int, value: float) -> str:
        return f"pruned by the {self.pruner} pruner at step {step} ({self.monitor} {value:.4g})"

    def on_evaluate(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        value = metrics[self.monitor]
        if self.report(trainer.step, value):
            self.run.prune(self.why(trainer.step, value))


def optuna_search(task: str | Task, space: Space, trials: int, steps: int, settings: Mapping[str, Any],
                  root: Path, pruner: str | None, seed: int) -> None:
    """Run an Optuna search of ``trials`` finished or pruned trials in this process (module docstring)."""
    optuna = import_optuna()
    monitor = settings.get("monitor", "val_loss")
    mode = resolve_mode(monitor, settings.get("mode"))
    root.mkdir(parents=True, exist_ok=True)
    study = optuna.create_study(storage=f"sqlite:///{root / STUDY_FILE}", study_name=STUDY_NAME, load_if_exists=True,
                                direction="minimize" if mode == "min" else "maximize",
                                pruner=_pruner(optuna, pruner, settings.get("eval_every", 50), steps))
    States = optuna.trial.TrialState
    # Trials an interruption cut off are still "running" in the study: each is continued in place, its number,
    # parameters and reported values kept, so the pruner's rungs hold no duplicate of it. (Optuna has no public
    # handle on a running trial but its constructor, which takes the trial's storage id.)
    for cut_off in study.get_trials(deepcopy=False, states=(States.RUNNING,)):
        _trial(study, optuna.trial.Trial(study, cut_off._trial_id), task, space, steps, settings, root, pruner, seed)
    while (done := len(study.get_trials(deepcopy=False, states=(States.COMPLETE, States.PRUNED)))) < trials:
        study.sampler = optuna.samplers.TPESampler(seed=seed + done)  # the same trials after an interruption
        _trial(study, study.ask(), task, space, steps, settings, root, pruner, seed)


def _trial(study: Any, trial: Any, task: str | Task, space: Space, steps: int, settings: Mapping[str, Any],
           root: Path, pruner: str | None, seed: int) -> None:
    """Train (or continue) the run of one Optuna trial, reporting its validations, and tell the study how it
    ended. An exception leaves the trial running in the study, so the next search continues it."""
    States = import_optuna().trial.TrialState
    monitor = settings.get("monitor", "val_loss")
    variant, rank, lr = space.suggest(trial)
    reporter = _Reporter(trial, monitor, pruner)
    reporter.reported |= set(study.trials[trial.number].intermediate_values)  # reported before a cut-off
    run = build_trial(task, Trial(root / _name(variant, rank, lr, seed, settings), variant, rank, lr, seed), steps,
                      {**settings, "callbacks": [*settings.get("callbacks", ()), reporter]})
    trial.set_user_attr("run", run.path.name)
    reporter.run = run
    history = _history(run.path, monitor)  # a run that trained before: its evaluations are reported first
    if run.finished:
        for step, value in history:
            reporter.report(step, value)
    else:
        pruned = next(((step, value) for step, value in history if reporter.report(step, value)), None)
        if pruned is not None:
            run.prune(reporter.why(*pruned))
        else:
            run.fit()
    record = read_record(run.path)
    best = load_runs(run.path).iloc[0]["best_value"]
    if record["status"] == PRUNED:
        study.tell(trial, state=States.PRUNED)
    elif record["status"] == "finished" and best is not None and not math.isnan(best):
        study.tell(trial, float(best))
    else:  # diverged before any validation: nothing to compare
        study.tell(trial, state=States.FAIL)


def _name(variant: str, rank: int | None, lr: float, seed: int, settings: Mapping[str, Any]) -> str:
    init = "default" if is_baseline(variant) else settings.get("init", "default")
    return trial_name(variant, rank, lr, seed, init=init)


def begin_search(root: Path, search: dict[str, Any]) -> None:
    """Record what a search of ``root`` searches (``SEARCH_FILE``); refuse to continue one that searched another
    space, budget, seed, pruner or monitor there."""
    there = read_search(root)
    if there is None:
        root.mkdir(parents=True, exist_ok=True)
        write_json(root / SEARCH_FILE, search)
    elif there != search:
        changed = [f"{key}: {there.get(key)!r} there, {value!r} here" for key, value in search.items()
                   if there.get(key) != value]
        raise ValueError(f"{root} holds another search ({SEARCH_FILE}): it differs in " + "; ".join(changed)
                         + ". Give a new directory, or the same arguments to continue it")


def read_search(directory: str | os.PathLike[str]) -> dict[str, Any] | None:
    """What the search in ``directory`` searched (``begin_search``), or None if it holds no search."""
    path = Path(directory) / SEARCH_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def search_compute(runs: pd.DataFrame, search: dict[str, Any], grid: pd.DataFrame | None = None) -> dict[str, Any]:
    """What a search's runs (``load_runs``) cost against the full grid of its space, and what each found.

    Keys: trials (asked of the sampler), runs (configurations trained: a configuration sampled again
    is its run's result again, not trained twice), pruned, steps (optimizer steps trained, summed over
    its runs), grid_runs and grid_steps (the full grid: every configuration to the end), wall_time
    (seconds, summed over runs), best_run and best_value (its best run by validation, ``wb.selection``);
    given the grid's own runs, also grid_wall_time, grid_best_run, grid_best_value and same_best (the
    search's best configuration is the grid's).
    """
    mode = resolve_mode(search["monitor"], None)
    found = best_index(runs["best_value"], mode)
    result = {"trials": search["trials"], "runs": len(runs), "pruned": int((runs["status"] == PRUNED).sum()),
              "steps": int(runs["steps_done"].sum()), "grid_runs": Space(**search["space"]).size(),
              "wall_time": float(runs["wall_time"].sum()),
              "best_run": None if found is None else runs.loc[found, "run"],
              "best_value": None if found is None else float(runs.loc[found, "best_value"])}
    result["grid_steps"] = result["grid_runs"] * search["steps"]
    if grid is not None:
        best = best_index(grid["best_value"], mode)
        result |= {"grid_wall_time": float(grid["wall_time"].sum()),
                   "grid_best_run": None if best is None else grid.loc[best, "run"],
                   "grid_best_value": None if best is None else float(grid.loc[best, "best_value"])}
        result["same_best"] = result["best_run"] == result["grid_best_run"]
    return result


# -- Ray Tune ----------------------------------------------------------------------------------


def import_tune() -> ModuleType:
    try:
        from ray import tune
    except ImportError as error:
        raise MissingExtraError("search='optuna' with executor='ray' needs Ray Tune: "
                                "pip install 'adapter-workbench[ray]'") from error
    return tune


class _TuneReporter(Callback):
    """Reports each checkpoint's metrics to Ray Tune once it is on disk, so a trial that Tune stops there has
    its checkpoint; when Tune's scheduler stops the trial (Ray ends its thread with ``SystemExit`` at the
    report), the run is pruned at that step instead. The last step is reported after the run's test."""

    def __init__(self, monitor: str, pruner: str | None) -> None:
        self.monitor, self.pruner = monitor, pruner
        self.run: Any = None  # the Run, set once it is built

    def report(self, step: int, value: float) -> bool:
        """Report to Tune; whether its scheduler stopped the trial (the run is then pruned)."""
        try:
            import_tune().report({self.monitor: value, "step": step})
        except SystemExit:
            self.run.prune(f"stopped by Ray Tune's {self.pruner} scheduler at step {step} ({self.monitor} {value:.4g})")
            return True
        return False

    def on_save(self, trainer: Trainer, path: Path) -> None:
        if self.monitor in trainer.last_metrics and trainer.step < trainer.steps:
            self.report(trainer.step, trainer.last_metrics[self.monitor])


def _tune_trial(config: dict[str, Any], task: str | Task, space: Space, steps: int, settings: Mapping[str, Any],
                root: Path, seed: int, threads: int, pruner: str | None) -> None:
    """One Tune trial, in a Ray worker: build (or resume) its run, report its logged evaluations, train."""
    import torch

    torch.set_num_threads(threads)
    variant = config["variant"]
    rank = None if is_baseline(variant) else config["rank"]
    lr = config[space.lr_name(variant)]
    monitor = settings.get("monitor", "val_loss")
    reporter = _TuneReporter(monitor, pruner)
    quiet = {**settings, "progress_bar": False, "callbacks": [*settings.get("callbacks", ()), reporter]}
    run = build_trial(task, Trial(root / _name(variant, rank, lr, seed, settings), variant, rank, lr, seed),
                      steps, quiet)
    reporter.run = run
    if not run.finished:  # a configuration sampled again finds its run done: its result is reported again
        if any(reporter.report(step, value) for step, value in _history(run.path, monitor) if step < steps):
            return  # what it trained before Ray restarted it sufficed for the scheduler to stop it
        if run.fit()["status"] == PRUNED:
            return
    best = load_runs(run.path).iloc[0]["best_value"]
    if best is None or math.isnan(best):  # diverged before any validation: the worst value there is
        best = math.inf if resolve_mode(monitor, settings.get("mode")) == "min" else -math.inf
    with contextlib.suppress(SystemExit):  # the trial's last result, its best validation: Tune ends it here
        import_tune().report({monitor: float(best), "step": steps})


def _define(space: Space, trial: Any) -> None:
    """Tune's define-by-run space (a module function, so Tune can pickle the searcher with it)."""
    space.suggest(trial)


def ray_search(task: str | Task, space: Space, trials: int, steps: int, settings: Mapping[str, Any], root: Path,
               pruner: str | None, seed: int, address: str | None, cpus_per_trial: int) -> None:
    """Run the search with Ray Tune: Optuna's TPE through ``OptunaSearch``, Tune's scheduler for the pruner."""
    tune = import_tune()
    from ray.tune.schedulers import AsyncHyperBandScheduler, FIFOScheduler, MedianStoppingRule
    from ray.tune.search.optuna import OptunaSearch

    optuna = import_optuna()
    monitor = settings.get("monitor", "val_loss")
    mode = resolve_mode(monitor, settings.get("mode"))
    eval_every = settings.get("eval_every", 50)
    schedulers = {
        "successive-halving": lambda: AsyncHyperBandScheduler(time_attr="step", max_t=steps, grace_period=eval_every,
                                                              reduction_factor=REDUCTION_FACTOR, brackets=1),
        "hyperband": lambda: AsyncHyperBandScheduler(time_attr="step", max_t=steps, grace_period=eval_every,
                                                     reduction_factor=REDUCTION_FACTOR, brackets=3),
        "median": lambda: MedianStoppingRule(time_attr="step", grace_period=eval_every, min_samples_required=2),
        None: FIFOScheduler,
    }

    root.mkdir(parents=True, exist_ok=True)
    trainable = tune.with_resources(
        tune.with_parameters(_tune_trial, task=task, space=space, steps=steps, settings=settings, root=root,
                             seed=seed, threads=cpus_per_trial, pruner=pruner), {"cpu": cpus_per_trial})
    experiment = root / TUNE_DIR
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        with ray_connection(address, num_cpus=os.cpu_count()):
            logging.getLogger("ray.tune").setLevel(logging.WARNING)
            if tune.Tuner.can_restore(str(experiment)):
                tuner = tune.Tuner.restore(str(experiment), trainable, resume_unfinished=True, resume_errored=True)
            else:
                searcher = OptunaSearch(functools.partial(_define, space), metric=monitor, mode=mode,
                                        sampler=optuna.samplers.TPESampler(seed=seed))
                tuner = tune.Tuner(
                    trainable,
                    tune_config=tune.TuneConfig(metric=monitor, mode=mode, search_alg=searcher,
                                                scheduler=schedulers[pruner](), num_samples=trials),
                    run_config=tune.RunConfig(name=TUNE_DIR, storage_path=str(root), verbose=0,
                                              failure_config=tune.FailureConfig(max_failures=3)))
            results = tuner.fit()
    errors = [result.error for result in results if result.error is not None]
    if errors:
        raise errors[0]
