"""Compress a task's pretrained model and recover: three runs side by side, one per stage.

``compress_task(task, out, energy=0.9)`` writes a directory of runs::

    out/svd/            the base factorised at full rank (``wb.compress`` with no budget): the original
                        outputs within float32 rounding, validated and tested; its checkpoint "svd"
    out/rank-reduced/   truncated to the ranks the budget chose; checkpoint "rank-reduced"
    out/finetuned/      recovered by training from the truncated model; its last checkpoint "finetuned"

Each records ``settings["compression"]`` (the per-layer ranks, and the rank, energy or budget
asked), so ``load_run_model``, the checkpoint browser, the runs table and the report rebuild and
read them as any run. Staged checkpoints are never pruned. ``compression_stages(out)`` lists the
three with their parameter count, checkpoint size and metrics.

Recovery trains, by default, the compressed factors themselves (``recover="factors"``: the "head"
baseline with every factor and the task's own trained modules in ``train=``): the recovered model
then has exactly the truncated model's parameters and no extra path. Any adapter variant may
recover instead (``recover="lora"``, on the factors ``up`` and ``down`` of every compressed layer;
merged, the update stays inside the factors, so the size stays too).
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any

import pandas as pd

from ..adapt import trainable_parameters
from ..baselines import BASELINES
from ..checkpoints import stages
from ..compress import compress, compressed_ranks
from ..targets import Targets, find_targets
from ..tasks import Task, get_task
from ..trainer import evaluate_task, held_out_metrics
from .layout import is_run, read_record, write_record
from .run import Run
from .tables import load_runs

STAGE_RUNS = stages.COMPRESSION_STAGES  # the run directories of compress_task, named for their stages, in order
FACTORS = "factors"  # recover by training the compressed factors (the default)
FACTOR_TARGETS = ["up", "down"]  # an adapter's default targets on a compressed model: every layer's two factors
# what the stages that do not train share with the recovery run: its trainer and checkpoint settings, not its
# adapter's (alpha, targets, train, a variant's options), which the stages' "head" recipe does not take
STAGE_SETTINGS = {name for name, parameter in inspect.signature(Run).parameters.items()
                  if parameter.kind is parameter.KEYWORD_ONLY} - {"alpha", "targets", "train", "resume", "compression"}


def compress_task(
    task: str | Task,
    out: str | os.PathLike[str],
    *,
    rank: int | None = None,
    energy: float | None = None,
    params: int | None = None,
    layers: Targets = None,
    recover: str = FACTORS,
    recover_rank: int | None = 8,
    steps: int = 300,
    lr: float = 1e-4,
    seed: int = 0,
    **settings: Any,
) -> pd.DataFrame:
    """Compress ``task``'s base by truncated SVD, then recover by training; the three stages as runs in ``out``.

    Args:
        task: a task name or a ``wb.tasks.Task``.
        out: a new directory (or one this function wrote, to finish its missing stages).
        rank, energy, params: how ``wb.compress`` chooses each layer's rank (one of them).
        layers: the layers to compress (``wb.compress``'s targets); default every linear layer except
            the task's own trained modules (``Task.default_train``, e.g. a new head).
        recover: ``"factors"`` (train the compressed factors) or an adapter variant, e.g. ``"lora"``,
            at ``recover_rank``, on the factors (``targets=["up", "down"]``), or ``"full"``.
        steps, lr, seed, **settings: the recovery run's (``wb.Run``): eval_every, save_every, ...; ``targets``
            and ``train`` replace the defaults above.

    Returns:
        ``compression_stages(out)``: one row per stage.

    Raises:
        ValueError: no or several budgets, a bad budget, ``out`` a file or holding other runs, or a
            recovery that is neither "factors", a variant nor a baseline; nothing is written then.
    """
    task = get_task(task) if isinstance(task, str) else task
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} is a file; the stages are written as a directory of runs: give a new directory")
    if sum(value is not None for value in (rank, energy, params)) != 1:
        raise ValueError("give one of rank, energy or params: how many singular values each layer keeps")
    settings = dict(settings)
    foreign = sorted(p.name for p in out.iterdir() if is_run(p) and p.name not in STAGE_RUNS) if out.is_dir() else []
    if foreign:
        raise ValueError(f"{out} holds other runs ({', '.join(foreign)}); give a new directory for the stages")
    base = task.base_model()
    if layers is None:  # every linear layer but those of modules the task trains in full (a new head)
        layers = list(find_targets(base, None, train=task.default_train))
    full = compress(base, targets=layers)  # checks the targets before anything is written
    svd_ranks = {str(row.layer): int(row.rank) for row in full.itertuples()}
    reduced = compress(base, rank=rank, energy=energy, params=params)  # truncates the factors: the same SVD
    asked = {"rank": rank, "energy": energy, "params": params}
    ranks = compressed_ranks(base)
    chosen = _recovery(task, ranks, recover, recover_rank, settings.pop("targets", None), settings.pop("train", None))
    recovery = Run(task, **chosen, out=out / stages.FINETUNED, resume=True,
                   compression={"ranks": ranks, **asked, "stage": stages.FINETUNED}, lr=lr, steps=steps, seed=seed,
                   **settings)  # checks every setting before a stage is written
    try:
        for stage, stage_ranks, table in ((stages.SVD, svd_ranks, full), (stages.RANK_REDUCED, ranks, reduced)):
            _write_stage(task, out / stage, stage, {"ranks": stage_ranks, **asked, "stage": stage}, table,
                         lr=lr, steps=steps, seed=seed,
                         **{key: value for key, value in settings.items() if key in STAGE_SETTINGS})
    except BaseException:
        recovery.checkpoints.close()
        recovery.discard()
        raise
    recovery.fit()
    return compression_stages(out)


def _factor_train(task: Task, ranks: dict[str, int]) -> list[str]:
    """``train=`` for recovery of the factors: each compressed layer, and the task's own trained modules."""
    return [*ranks, *(task.default_train or [])]


def _recovery(task: Task, ranks: dict[str, int], recover: str, recover_rank: int | None,
              targets: Targets, train: Targets) -> dict[str, Any]:
    """The recovery run's variant, rank, and what it adapts (``targets``, default the factors) or trains in full
    (``train``, default the factors and the task's own trained modules for "factors", else the task's)."""
    if recover == FACTORS:
        return {"variant": "head", "rank": None, "train": train or _factor_train(task, ranks)}
    if recover in BASELINES:
        return {"variant": recover, "rank": None, **({"train": train} if train else {})}
    return {"variant": recover, "rank": recover_rank, "targets": targets or FACTOR_TARGETS,
            **({"train": train} if train else {})}


def _write_stage(task: Task, out: Path, stage: str, compression: dict[str, Any], table: pd.DataFrame,
                 **settings: Any) -> None:
    """A stage that does not train (svd, rank-reduced): its model built by a run's own recipe, validated and
    tested, saved as one staged checkpoint at step 0 of a run of its own. A stage written already is kept."""
    if is_run(out):
        return
    run = Run(task, "head", None, out, train=_factor_train(task, compression["ranks"]), compression=compression,
              **settings)
    model, precision = run.model, run.settings["precision"]
    loaders = task.loaders(run.settings["seed"])
    try:
        path = run.checkpoints.save(0, model, metrics=evaluate_task(model, task, loaders["val"], "val", precision),
                                    stage=stage)
    finally:
        run.checkpoints.close()
    write_record(out, {
        "settings": run.settings, "status": stage, "compression_table": table.to_dict("records"),
        "trainable": trainable_parameters(model), "parameters": sum(p.numel() for p in model.parameters()),
        "steps_done": 0, "wall_time": 0.0,
        "test": {"checkpoint": path.name, "step": 0, **held_out_metrics(model, task, loaders, precision)},
    })


def compression_stages(runs: pd.DataFrame | str | os.PathLike[str]) -> pd.DataFrame:
    """The stage runs of a compressed model, in stage order: one row each (none if there are none).

    Args:
        runs: a directory written by ``compress_task`` (or one of its stage runs), or ``load_runs``' table
            of it; its runs whose ``compression_stage`` is svd, rank-reduced or finetuned are listed.

    Columns: stage, run, status, parameters (the whole model's), compressed_layers, mean_rank (over
    the compressed layers), checkpoint_bytes (the stage's best checkpoint on disk; the finetuned
    one holds the optimizer state too), the validation metrics of that checkpoint and its test
    metrics, path.
    """
    runs = runs if isinstance(runs, pd.DataFrame) else load_runs(runs)
    if "compression_stage" not in runs:
        return pd.DataFrame()
    staged = runs[runs["compression_stage"].isin(STAGE_RUNS)]
    rows = []
    for _, row in staged.sort_values("compression_stage", key=lambda s: s.map(STAGE_RUNS.index)).iterrows():
        ranks = list(read_record(Path(row["path"]))["settings"]["compression"]["ranks"].values())
        checkpoint = row["best_checkpoint"]
        size = sum(f.stat().st_size for f in Path(checkpoint).iterdir()) if isinstance(checkpoint, str) else None
        metrics = {key: row[key] for key in row.index if key.startswith(("val_", "test_", "forget_"))
                   and pd.notna(row[key])}
        rows.append({"stage": row["compression_stage"], "run": row["run"], "status": row["status"],
                     "parameters": row["parameters"], "compressed_layers": len(ranks),
                     "mean_rank": sum(ranks) / len(ranks) if ranks else None, "checkpoint_bytes": size, **metrics,
                     "path": row["path"]})
    return pd.DataFrame(rows)
