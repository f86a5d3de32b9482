"""Operations on a run's checkpoints: rebuild and load, evaluate, export, delete, reduce, spectra.

Each rebuilds the run's model from its recorded settings (``layout.build_model``) and loads a
checkpoint into it, so it works on any run directory, also one written by another process.
Loading, evaluating and the merged export work on every run, a baseline's ("full", "head") too;
what needs adapters (export in PEFT's format, rank reduction, spectra, effective ranks) refuses a
baseline run.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from safetensors.torch import save_file, save_model
from torch import nn

from .. import svd
from ..adapt import remove_adapters, trainable_parameters
from ..baselines import BASELINES, is_baseline
from ..checkpoints import CheckpointError, CheckpointManager, stages
from ..checkpoints.files import write_directory
from ..peft_format import export_peft
from ..svd import match_ranks, reduce_rank
from ..tasks import Task, get_task
from ..tasks.text import transformers_part
from ..trainer import evaluate_task, held_out_metrics
from .layout import (
    RunSettings,
    build_model,
    checkpoints_path,
    is_run,
    read_record,
    records,
    run_of,
    task_of,
    write_record,
)
from .tables import checkpoint_table, load_checkpoints

ModelOrCheckpoint = nn.Module | str | os.PathLike[str]


def refuse_baseline(settings: RunSettings, run: Path, needs: str) -> None:
    """Refuse an operation that needs adapters (``needs``, in words) on a baseline's run.

    Raises:
        ValueError: the run is of a baseline; the message names it and what works instead.
    """
    name = settings["variant"]
    if is_baseline(name):
        raise ValueError(f"run {run.name} is the baseline {name!r} ({BASELINES[name]}): it has no adapters, so "
                         f"{needs}. Its checkpoints load as its whole model with wb.load_run_model(checkpoint) "
                         "(and score with wb.evaluate_checkpoint)")


def _settings_of(checkpoint: str | os.PathLike[str], needs: str) -> RunSettings:
    """The settings of a checkpoint's run, refused for a baseline (``refuse_baseline``)."""
    run = run_of(Path(checkpoint))
    settings = read_record(run)["settings"]
    refuse_baseline(settings, run, needs)
    return settings


def load_run_model(checkpoint: str | os.PathLike[str], task: Task | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a run's adapted model and load ``checkpoint`` into it; returns (model, progress).

    A checkpoint written after ``wb.reduce_rank`` loads too: the rebuilt layers take its ranks first.
    A baseline's run ("full", "head") rebuilds the task's base model with its trained parameters.
    ``task``: the run's task when it is not a built-in one (a ``wb.tasks.Task`` of the recorded name).

    Raises:
        ValueError: not a checkpoint of a run, or a run of a task that is not built in and not given.
        CheckpointError: the checkpoint fails verification or does not fit the rebuilt model.
    """
    checkpoint = Path(checkpoint)
    settings = read_record(run_of(checkpoint))["settings"]
    task = task_of(settings, task)
    model = match_ranks(build_model(task, settings), checkpoint)  # a rank-reduced checkpoint's shapes
    return model, CheckpointManager(checkpoint.parent).load(checkpoint, model)


def evaluate_checkpoints(run: str | os.PathLike[str], split: str = "val", task: Task | None = None) -> pd.DataFrame:
    """Evaluate every checkpoint of a run again on ``split``: step, path, stage, <split>_loss, <split>_acc."""
    run = Path(run)
    settings = read_record(run)["settings"]
    task = task_of(settings, task)
    loader = task.loaders(settings["seed"])[split]
    rows = []
    for _, row in checkpoint_table(run).iterrows():
        model, _ = load_run_model(row["path"], task)
        rows.append({"step": row["step"], "path": row["path"], "stage": row["stage"],
                     **evaluate_task(model, task, loader, split, settings["precision"])})
    return pd.DataFrame(rows)


EXPORT_FORMATS = {  # export_checkpoint's formats: what each writes
    "peft": "the adapter in PEFT's format (adapter_config.json, adapter_model.safetensors), for "
            "PeftModel.from_pretrained on the base model",
    "merged": "the whole model with the adapters folded into its weights, for transformers' from_pretrained "
              "where the base came from transformers (model.safetensors, config.json, the tokenizer)",
}
HEAD_FILE = "head.safetensors"  # a merged export's parameters outside the transformers model (a new head)


def _export_target(to: str | os.PathLike[str]) -> Path:
    """``to``, refused when it exists and is not an empty directory (nothing is overwritten)."""
    target = Path(to).expanduser()
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise ValueError(f"{target} exists and is not an empty directory: choose a new or empty one")
    return target


def export_checkpoint(checkpoint: str | os.PathLike[str], to: str | os.PathLike[str], format: str = "peft",
                      task: Task | None = None) -> Path:
    """Export a run's checkpoint for another tool to load: its adapter (``"peft"``) or the merged model.

    ``format="merged"`` rebuilds the run's model, folds every adapter into its weight
    (W <- W + delta W, ``remove_adapters(model, merge=True)``; a baseline's model as trained) and
    writes a plain model that needs no adapter code:

    - a task on a transformers causal LM (hamlet, ``causal_lm``): ``save_pretrained`` of the model
      and the task's tokenizer, so ``AutoModelForCausalLM.from_pretrained(to)`` loads it;
    - a text classifier (reviews, ``text_classification``): the encoder by ``save_pretrained``
      (``AutoModel.from_pretrained(to)``) with the tokenizer, and the head, which transformers has
      no class for (mean pooling), in ``head.safetensors`` under its names (``classifier.weight``);
    - any other model (digits): its state dict in ``model.safetensors``, for
      ``task.base_model().load_state_dict``.

    ``to`` is written atomically (``write_directory``): after a failure it is absent or complete.

    Raises:
        ValueError: an unknown format (the message names the valid ones), ``to`` exists and is not
            an empty directory, a baseline's run in PEFT's format (it has no adapter), or a
            compressed run merged (its factorised layers are no transformers architecture).
    """
    if format not in EXPORT_FORMATS:
        raise ValueError(f"unknown export format {format!r}; valid formats: "
                         + "; ".join(f"{name}: {about}" for name, about in EXPORT_FORMATS.items()))
    target = _export_target(to)
    if format == "peft":
        _settings_of(checkpoint, "there is no adapter to export in PEFT's format (format='merged' saves its model)")
        model, _ = load_run_model(checkpoint, task)
        return export_peft(model, target)
    settings = read_record(run_of(Path(checkpoint)))["settings"]
    if settings["compression"]:
        raise ValueError(f"{checkpoint} is of a compressed model: its factorised layers are no architecture "
                         "transformers loads; export its adapter (format='peft') or load it with wb.load_run_model")
    task = task_of(settings, task)
    model, _ = load_run_model(checkpoint, task)
    if not is_baseline(settings["variant"]):
        remove_adapters(model, merge=True)
    if target.exists():
        target.rmdir()  # empty (checked): write_directory puts the complete directory in its place
    write_directory(target, lambda directory: _write_merged(model, task, directory))
    return target


def _write_merged(model: nn.Module, task: Task, directory: Path) -> None:
    """``export_checkpoint``'s merged files of ``model`` (no adapters left) in ``directory``."""
    part = transformers_part(model)
    if part is None:
        save_model(model, str(directory / "model.safetensors"))
        return
    prefix, pretrained = part
    pretrained.save_pretrained(directory, safe_serialization=True)
    if task.tokenizer is not None:
        task.tokenizer.save_pretrained(directory)
    head = {name: tensor.contiguous() for name, tensor in model.state_dict().items() if not name.startswith(prefix)}
    if head:
        save_file(head, str(directory / HEAD_FILE))


def evaluate_checkpoint(checkpoint: str | os.PathLike[str], split: str = "val", task: Task | None = None
                        ) -> dict[str, float]:
    """Load a run's checkpoint into a fresh model and measure it on ``split`` of the run's data.

    Returns ``{"<split>_loss", "<split>_acc"}``, as ``wb.evaluate``; the same numbers as the
    checkpoint's row of ``evaluate_checkpoints(run, split)``.

    Raises:
        ValueError: ``checkpoint`` is not a checkpoint of a run directory, or an unknown split.
    """
    checkpoint = Path(checkpoint)
    settings = read_record(run_of(checkpoint))["settings"]
    task = task_of(settings, task)
    loaders = task.loaders(settings["seed"])
    if split not in loaders:
        raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(loaders)}")
    model, _ = load_run_model(checkpoint, task)
    return evaluate_task(model, task, loaders[split], split, settings["precision"])


def frozen_metrics(task: str | Task, seed: int = 0, precision: str = "float32") -> dict[str, float]:
    """The baseline before adaptation: the task's base model, as a run with this seed starts, on the held-out splits.

    The base is built under ``torch.manual_seed(seed)`` like a run's, so a new head (the reviews
    task's classifier) has the very initial weights the runs of that seed start from. Returns
    test_loss, test_acc (and test_ppl, forget_* for a language model), as a run's test metrics.
    """
    task = get_task(task) if isinstance(task, str) else task
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = task.base_model()
    return held_out_metrics(model, task, task.loaders(seed), precision)


def delete_checkpoint(checkpoint: str | os.PathLike[str]) -> None:
    """Delete one checkpoint directory of a run (``CheckpointManager.delete``), then release the lock.

    Raises:
        CheckpointError: another process or run is writing checkpoints there (holds the lock),
            or ``checkpoint`` is not a checkpoint of its directory.
    """
    checkpoint = Path(checkpoint)
    if not checkpoint.is_dir():
        raise CheckpointError(f"{checkpoint}: no such checkpoint")
    manager = CheckpointManager(checkpoint.parent)
    try:
        manager.delete(checkpoint)
    finally:
        manager.close()


def reduce_checkpoint(
    checkpoint: str | os.PathLike[str],
    out: str | os.PathLike[str],
    rank: int | None = None,
    energy: float | None = None,
    task: Task | None = None,
) -> tuple[Path, pd.DataFrame]:
    """Reduce a run's checkpoint to a lower rank (``wb.reduce_rank``) and keep it as a run of its own.

    ``out`` becomes a run directory whose ``config.json`` holds the source run's settings (the
    recipe its model is built by: rank, alpha and init as trained, so a PiSSA residual is rebuilt
    the same), ``status`` "rank-reduced", ``reduced_from`` and the per-layer table; its one
    checkpoint, at the source's step with stage "rank-reduced", holds the reduced adapters (no
    optimizer state: the factors are new tensors) and their validation metrics, and the record
    has their test metrics, so the runs table compares it with the run it came from.

    Returns:
        (the new checkpoint's path, ``reduce_rank``'s per-layer table).

    Raises:
        ValueError: ``out`` holds a run already, ``checkpoint`` is not a run's or is a baseline's,
            or a bad rank / energy (see ``wb.reduce_rank``); nothing is written then.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} is a file; the reduced checkpoint is kept as a run directory: give a new directory")
    if is_run(out):
        raise ValueError(f"{out} holds a run already; choose another directory for the reduced checkpoint")
    settings = _settings_of(checkpoint, "there is no adapter to reduce to a lower rank")
    task = task_of(settings, task)
    model, progress = load_run_model(checkpoint, task)
    table = reduce_rank(model, rank=rank, energy=energy)
    loaders = task.loaders(settings["seed"])
    metrics = evaluate_task(model, task, loaders["val"], "val", settings["precision"])
    out.mkdir(parents=True, exist_ok=True)
    with CheckpointManager(checkpoints_path(out), monitor=settings["monitor"], mode=settings["mode"],
                           run_config=settings) as manager:
        path = manager.save(progress["step"], model, metrics=metrics, stage=stages.RANK_REDUCED)
    write_record(out, {
        "settings": settings, "status": stages.RANK_REDUCED, "reduced_from": str(Path(checkpoint).resolve()),
        "reduction": {"rank": rank, "energy": energy, "layers": table.to_dict("records")},
        "trainable": trainable_parameters(model), "steps_done": progress["step"], "wall_time": 0.0,
        "test": {"checkpoint": path.name, "step": progress["step"],
                 **held_out_metrics(model, task, loaders, settings["precision"])},
    })
    return path, table


def _model_of(model_or_checkpoint: ModelOrCheckpoint, task: Task | None) -> nn.Module:
    if isinstance(model_or_checkpoint, nn.Module):
        return model_or_checkpoint
    _settings_of(model_or_checkpoint, "there is no adapter update to take the spectrum or effective rank of")
    return load_run_model(model_or_checkpoint, task)[0]


def spectrum(model_or_checkpoint: ModelOrCheckpoint, task: Task | None = None) -> pd.DataFrame:
    """``workbench.svd.spectrum`` of an adapted model, or of a run's checkpoint (loaded with ``load_run_model``,
    ``task`` as there); a checkpoint of a baseline's run is refused (a ValueError): it has no adapters."""
    return svd.spectrum(_model_of(model_or_checkpoint, task))


def effective_rank(spectrum_or_model: pd.DataFrame | ModelOrCheckpoint, energy: float = 0.9,
                   task: Task | None = None) -> pd.Series:
    """``workbench.svd.effective_rank`` of a spectrum table, an adapted model, or a run's checkpoint (not a
    baseline's: see ``spectrum``)."""
    if isinstance(spectrum_or_model, pd.DataFrame):
        return svd.effective_rank(spectrum_or_model, energy)
    svd.check_energy(energy)
    return svd.effective_rank(_model_of(spectrum_or_model, task), energy)


def spectrum_over_checkpoints(run: str | os.PathLike[str], energy: float = 0.9,
                              task: Task | None = None) -> pd.DataFrame:
    """Every layer's effective rank at every checkpoint of a run (or of every run in a directory).

    Each checkpoint is loaded into a rebuilt model with ``load_run_model``. In a directory of
    runs, the baselines' runs are left out (they have no adapters); a baseline's run itself is refused.

    Returns:
        Columns run, step, stage, layer, effective_rank (see ``wb.effective_rank``); one row per
        checkpoint and layer, oldest checkpoint first. Draw it with
        ``wb.plots.effective_rank_over_checkpoints``.
    """
    energy = svd.check_energy(energy)
    found = records(run)
    if is_run(run):
        refuse_baseline(found[0][1]["settings"], found[0][0], "there are no adapter updates to take effective ranks of")
    adapted = {path.name for path, record in found if not is_baseline(record["settings"]["variant"])}
    rows = []
    for _, checkpoint in load_checkpoints(run).iterrows():
        if checkpoint["run"] not in adapted:
            continue
        model, _ = load_run_model(checkpoint["path"], task)
        for layer, rank in svd.effective_rank(model, energy).items():
            stage = checkpoint["stage"] if isinstance(checkpoint["stage"], str) else None
            rows.append({"run": checkpoint["run"], "step": int(checkpoint["step"]), "stage": stage,
                         "layer": layer, "effective_rank": int(rank)})
    return pd.DataFrame(rows, columns=["run", "step", "stage", "layer", "effective_rank"])
