"""Runs, sweeps and selection on the built-in digits task, checked against independent numbers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import workbench as wb
from workbench.runs import load_run_model
from workbench.tasks import get_task
from workbench.trainer import Callback

FAST = {"eval_every": 20, "save_every": 20, "progress_bar": False}


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


class Interrupt(Callback):
    """Ctrl-C in the middle of the run whose variant is ``variant``."""

    def __init__(self, at_step: int) -> None:
        self.at_step = at_step

    def on_step(self, trainer, loss):
        if trainer.step == self.at_step and wb.adapter_config(trainer.model).variant == "vera":
            raise KeyboardInterrupt


class Steps(Callback):
    def __init__(self) -> None:
        self.seen: list[tuple[str, int]] = []

    def on_step(self, trainer, loss):
        self.seen.append((wb.adapter_config(trainer.model).variant, trainer.step))


def test_an_interrupted_sweep_skips_finished_trials_and_resumes_the_rest(tmp_path):
    grid = {"variants": ["lora", "vera"], "ranks": [2], "steps": 60, "lrs": [1e-2]}
    reference = wb.sweep("digits", out=tmp_path / "reference", **grid, **FAST)
    with pytest.raises(KeyboardInterrupt):
        wb.sweep("digits", out=tmp_path / "sweep", callbacks=[Interrupt(at_step=30)], **grid, **FAST)
    table = wb.load_runs(tmp_path / "sweep")
    assert dict(zip(table["variant"], table["status"], strict=True)) == {"lora": "finished", "vera": "failed"}

    steps = Steps()
    resumed = wb.sweep("digits", out=tmp_path / "sweep", callbacks=[steps], **grid, **FAST)
    assert steps.seen == [("vera", s) for s in range(21, 61)]  # lora skipped; vera from its step-20 checkpoint
    columns = ["run", "variant", "rank", "trainable", "best_value", "best_step", "test_loss", "test_acc", "status"]
    assert resumed[columns].equals(reference[columns])
    metrics = wb.load_metrics(tmp_path / "sweep")
    assert metrics.equals(wb.load_metrics(tmp_path / "reference"))


def _independent_eval(model: nn.Module, split: str) -> tuple[float, float]:
    x, y = zip(*get_task("digits").datasets(0)[split], strict=True)
    x, y = torch.stack(x), torch.stack(y)
    model.eval()
    with torch.no_grad():
        logits = model(x)
    return nn.functional.cross_entropy(logits, y).item(), (logits.argmax(-1) == y).float().mean().item()


def test_best_checkpoint_and_test_figure_match_an_independent_evaluation(tmp_path):
    run = wb.train("digits", "lora", 4, tmp_path / "run", steps=100, lr=1e-2, **FAST)
    table = wb.load_runs(run)
    checkpoints = wb.CheckpointManager(run / "checkpoints").list()
    losses = {}
    for path in checkpoints["path"]:
        model, _ = load_run_model(path)
        losses[path] = _independent_eval(model, "val")
    best = min(losses, key=lambda p: losses[p][0])
    assert str(wb.best_checkpoint(run)) == best == table.loc[0, "best_checkpoint"]
    assert str(wb.best_checkpoint(tmp_path, metric="val_acc", mode="max")) == max(losses, key=lambda p: losses[p][1])

    again = wb.evaluate_checkpoints(run)
    for _, row in again.iterrows():
        assert row["val_loss"] == pytest.approx(losses[row["path"]][0], rel=1e-5)
    test_loss, test_acc = _independent_eval(load_run_model(best)[0], "test")
    assert table.loc[0, "test_acc"] == pytest.approx(test_acc) and table.loc[0, "test_loss"] == pytest.approx(test_loss, rel=1e-5)
    assert table.loc[0, "trainable"] == wb.trainable_parameters(load_run_model(best)[0])

    with pytest.raises(ValueError, match=r"metric must be a validation metric .* not 'test_acc'"):
        wb.best_checkpoint(run, metric="test_acc")


def test_a_run_directory_is_not_overwritten(tmp_path):
    wb.train("digits", "lora", 2, tmp_path / "run", steps=20, **FAST)
    with pytest.raises(ValueError, match=r"holds a run already; resume it"):
        wb.train("digits", "lora", 2, tmp_path / "run", steps=20, **FAST)
    with pytest.raises(ValueError, match=r"holds a different run; it differs in rank: 2 there, 4 here"):
        wb.train("digits", "lora", 4, tmp_path / "run", steps=20, resume=True, **FAST)


def test_a_reduced_checkpoint_is_a_run_of_its_own_that_loads_and_scores_as_reduced(tmp_path):
    source = wb.train("digits", "lora", 8, tmp_path / "full", steps=40, lr=1e-2, init="pissa", **FAST)
    full = wb.best_checkpoint(source)
    reduced, table = wb.reduce_checkpoint(full, tmp_path / "reduced", rank=2)

    expected, _ = load_run_model(full)  # the same reduction, done here on the loaded full model
    wb.reduce_rank(expected, rank=2)
    model, progress = load_run_model(reduced)
    x = torch.rand(16, 64)
    assert torch.allclose(model(x), expected(x), atol=1e-6)
    assert (table["new_rank"] == 2).all() and progress["stage"] == "rank-reduced"
    assert wb.CheckpointManager(reduced.parent).list()["stage"].tolist() == ["rank-reduced"]

    runs = wb.load_runs(tmp_path).set_index("run")
    assert runs.loc["reduced", "status"] == "rank-reduced"
    assert runs.loc["reduced", "trainable"] == wb.trainable_parameters(expected) < runs.loc["full", "trainable"]
    assert runs.loc["reduced", "best_value"] == pytest.approx(wb.evaluate_checkpoint(reduced)["val_loss"])
    assert runs.loc["reduced", "test_acc"] == wb.evaluate_checkpoint(reduced, split="test")["test_acc"]

    with pytest.raises(ValueError, match="holds a run already"):
        wb.reduce_checkpoint(full, tmp_path / "reduced", rank=1)
    with pytest.raises(ValueError, match="exactly one of rank"):
        wb.reduce_checkpoint(full, tmp_path / "none")
    assert not (tmp_path / "none").exists()

