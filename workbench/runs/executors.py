"""Where a sweep's trials run: one after another in this process, or as Ray tasks.

Ray is an optional extra (``pip install 'adapter-workbench[ray]'``), imported only when a sweep
asks for it: ``import workbench`` never loads it.

A trial is the same call on either executor, ``wb.Run(..., resume=True).fit()``. So a Ray trial
whose worker dies (killed, out of memory, a node lost) is run again by Ray's task retries and
continues from its run's newest valid checkpoint: the steps after that checkpoint are trained
again, identically, and the trainer drops their old metrics-log lines before writing them anew,
so a trial is never started over and no step is logged twice. Trials that finished are skipped.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from tqdm.auto import tqdm

from ..adapt import trainable_parameters
from ..baselines import baseline_settings, is_baseline
from ..tasks import Task
from .run import Run

EXECUTORS = ("local", "ray")
RETRIES = 3  # times Ray runs a trial again after its worker died; each retry resumes from a checkpoint
INSTALL_RAY = "pip install 'adapter-workbench[ray]'"


class MissingExtraError(ImportError):
    """A feature needs an optional dependency that is not installed; the message says how to install it."""


@dataclass(frozen=True)
class Trial:
    """One run of a sweep: its directory and the settings that vary between trials (a baseline's rank is None)."""

    path: Path
    variant: str
    rank: int | None
    lr: float
    seed: int


def trial_name(variant: str, rank: int | None, lr: float, seed: int, init: str = "default") -> str:
    """The run directory's name, e.g. ``lora-r8-lr0.003-s0``, or ``lora-r8-lr0.003-s0-pissa`` with PiSSA init.

    A baseline has no rank (``rank=None``): ``full-lr5e-05-s0``.
    """
    rank_part = "" if rank is None else f"-r{rank}"
    return f"{variant}{rank_part}-lr{lr:g}-s{seed}" + ("" if init == "default" else f"-{init}")


def build_trial(task: str | Task, trial: Trial, steps: int, settings: Mapping[str, Any]) -> Run:
    """The trial's ``Run``, to resume if its directory holds it already (a baseline gets only its own settings)."""
    if is_baseline(trial.variant):  # the sweep's adapter settings (alpha, targets, options) are not the baseline's
        settings = baseline_settings(trial.variant, settings)
    return Run(task, trial.variant, trial.rank, trial.path, lr=trial.lr, seed=trial.seed, steps=steps, resume=True,
               **settings)


def run_trial(task: str | Task, trial: Trial, steps: int, settings: Mapping[str, Any],
              threads: int | None = None) -> dict[str, Any]:
    """Train one trial, resume it from its newest checkpoint, or skip it if it finished; returns its record.

    ``threads``: torch's CPU threads for this process, set first (a Ray task sets its ``num_cpus``,
    so trials that share a machine do not oversubscribe its cores).
    """
    if threads is not None:
        torch.set_num_threads(threads)
    return build_trial(task, trial, steps, settings).fit()


def run_local(task: str | Task, trials: Sequence[Trial], steps: int, settings: Mapping[str, Any]) -> None:
    """Run the trials one after another in this process, each progress bar named "trial i/N <run>"."""
    for number, trial in enumerate(trials, start=1):
        label = f"trial {number}/{len(trials)} {trial.path.name}"
        run_trial(task, trial, steps, {**settings, "progress_label": label})


def import_ray() -> ModuleType:
    """``import ray``, or a ``MissingExtraError`` that says how to install it."""
    try:
        import ray
    except ImportError as error:
        raise MissingExtraError(f"executor 'ray' needs Ray, which is not installed: {INSTALL_RAY}") from error
    return ray


@contextmanager
def ray_connection(address: str | None = None, num_cpus: int | None = None) -> Iterator[ModuleType]:
    """Connect this process to Ray for the ``with`` block, and yield the ``ray`` module.

    ``address=None`` starts a local Ray instance with ``num_cpus`` CPUs (default: all cores), no
    dashboard and worker output kept out of this process's; an address (``HOST:PORT``, or
    ``auto`` for the cluster that ``RAY_ADDRESS`` or ``ray start`` names) joins a running
    cluster. Either way ``WORKBENCH_CACHE``, if set, is passed on to the workers, and the
    connection ends with the block. If this process is connected already (``ray.init`` was
    called), that connection is used as it is and kept.
    """
    ray = import_ray()
    if ray.is_initialized():
        yield ray
        return
    cache = {"WORKBENCH_CACHE": os.environ["WORKBENCH_CACHE"]} if "WORKBENCH_CACHE" in os.environ else {}
    options: dict[str, Any] = {"runtime_env": {"env_vars": cache}, "log_to_driver": False,
                               "logging_level": logging.WARNING}
    if address is None:  # "local": a new instance, even if RAY_ADDRESS or a `ray start` cluster is around
        options |= {"address": "local", "num_cpus": num_cpus, "include_dashboard": False}
    else:
        options["address"] = address
    ray.init(**options)
    try:
        yield ray
    finally:
        ray.shutdown()


def run_on_ray(task: str | Task, trials: Sequence[Trial], steps: int, settings: Mapping[str, Any],
               address: str | None = None, cpus_per_trial: int = 1) -> None:
    """Run each trial as a Ray task of ``cpus_per_trial`` CPUs (and as many torch threads).

    Every trial is built here first, as in-process, so bad settings fail at once, finished
    trials are skipped, and a base model missing from the cache is pre-trained once, not in
    every worker. Trials start in order of trainable parameters, most first (full fine-tuning,
    then adapters, then a head alone): a proxy for their cost, so that short trials fill the
    cores at the end rather than one long trial running alone (longest-first scheduling). A
    trial whose worker dies is retried (``RETRIES`` times) from its newest checkpoint. Once
    every trial has ended, the first trial error is raised, if any; an interruption here
    (Ctrl-C) cancels the trials still going, which resume when the sweep is run again.
    ``settings["progress_bar"]`` shows a bar of trials done instead of one per trial.
    """
    import_ray()  # before any work: a missing Ray fails at once
    unfinished: list[tuple[int, Trial]] = []  # (trainable parameters, trial); one model built at a time
    for trial in trials:
        run = build_trial(task, trial, steps, settings)
        if not run.finished:
            unfinished.append((trainable_parameters(run.model), trial))
    pending = [trial for _, trial in sorted(unfinished, key=lambda pair: -pair[0])]  # the longest first
    if not pending:
        return
    cores = max(cpus_per_trial, min(os.cpu_count() or 1, len(pending) * cpus_per_trial))
    quiet = {**settings, "progress_bar": False}  # a worker's output goes to Ray's log files, not here
    with ray_connection(address, num_cpus=cores) as ray:
        remote = ray.remote(run_trial).options(num_cpus=cpus_per_trial, max_retries=RETRIES)
        running = [remote.remote(task, trial, steps, quiet, cpus_per_trial) for trial in pending]
        errors: list[BaseException] = []
        bar = tqdm(total=len(running), desc=f"trials on Ray ({cores} CPUs)",
                   disable=not settings.get("progress_bar", True))
        try:
            while running:
                done, running = ray.wait(running, num_returns=1)
                try:
                    ray.get(done[0])
                except ray.exceptions.RayTaskError as error:  # the trial raised: keep its own exception
                    errors.append(error.cause if isinstance(error.cause, BaseException) else error)
                except ray.exceptions.RayError as error:  # its worker died more than RETRIES times, ...
                    errors.append(error)
                bar.update(1)
        finally:
            bar.close()
            for ref in running:
                ray.cancel(ref, force=True)
        if errors:
            raise errors[0]
