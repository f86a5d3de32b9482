"""The trainer: evaluation and checkpoints as it goes, stop, divergence, callbacks, exact resume."""

from __future__ import annotations

import json
import math
import threading

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import TensorDataset

import workbench as wb
from workbench import metrics_log
from workbench.tasks import Task
from workbench.trainer import Callback, Trainer


def _scratch_task() -> Task:
    """Mirrored digits on a small MLP that is not pre-trained: fast, and independent of the built-in tasks."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32).reshape(-1, 8, 8).flip(-1).reshape(-1, 64) / 16
    y = torch.tensor(data.target)

    def datasets(seed: int) -> dict[str, TensorDataset]:
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
        parts = order[:1000], order[1000:1400], order[1400:]
        return {split: TensorDataset(x[idx], y[idx]) for split, idx in zip(("train", "val", "test"), parts, strict=True)}

    def base_model() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Dropout(0.1), nn.Linear(64, 10))

    return Task("scratch", base_model, datasets, batch_size=32)


def _trainer(tmp_path, name: str, steps: int = 60, callbacks=(), **kwargs) -> Trainer:
    task = _scratch_task()
    model = wb.add_adapters(task.base_model(), "lora", 4, dropout=0.1)
    return Trainer(model, task, lr=1e-2, steps=steps, eval_every=10, save_every=20, seed=3,
                   checkpoints=kwargs.pop("checkpoints", tmp_path / name / "checkpoints"), metrics_log=tmp_path / name / "metrics.jsonl",
                   callbacks=callbacks, progress_bar=False, **kwargs)


class Recorder(Callback):
    def __init__(self, stop_at: int | None = None) -> None:
        self.events: list[tuple[str, int]] = []
        self.stop_at = stop_at

    def on_step(self, trainer, loss):
        self.events.append(("step", trainer.step))
        if trainer.step == self.stop_at:
            threading.Thread(target=trainer.stop).start()  # stop() from another thread
            threading.Event().wait(0.05)

    def on_evaluate(self, trainer, metrics):
        self.events.append(("evaluate", trainer.step))

    def on_save(self, trainer, path):
        self.events.append(("save", trainer.step))

    def on_end(self, trainer):
        self.events.append(("end", trainer.step))


def _log(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _entries(run) -> list[tuple]:
    """The metrics log without wall-clock times, one entry per (step, split, metric)."""
    entries = {(e["step"], e["split"], e["metric"]): e["value"] for e in _log(run / "metrics.jsonl")}
    return sorted(entries.items())


def test_fit_validates_checkpoints_and_logs_as_it_goes(tmp_path):
    recorder = Recorder()
    trainer = _trainer(tmp_path, "run", callbacks=[recorder])
    assert trainer.fit() == "finished"
    table = wb.CheckpointManager(tmp_path / "run" / "checkpoints").list()
    assert table["step"].tolist() == [20, 40, 60]
    log = _log(tmp_path / "run" / "metrics.jsonl")
    val = {(e["step"], e["metric"]): e["value"] for e in log if e["split"] == "val"}
    assert sorted({step for step, _ in val}) == [10, 20, 30, 40, 50, 60]
    for _, row in table.iterrows():  # each checkpoint records the validation metrics of its step
        assert row["val_loss"] == val[(row["step"], "loss")] and row["val_acc"] == val[(row["step"], "acc")]
    assert val[(60, "loss")] < val[(10, "loss")]
    assert [e["step"] for e in log if e["split"] == "train"] == list(range(1, 61))
    assert recorder.events.count(("end", 60)) == 1
    assert [s for kind, s in recorder.events if kind == "evaluate"] == [10, 20, 30, 40, 50, 60]
    assert [s for kind, s in recorder.events if kind == "save"] == [20, 40, 60]


def test_evaluate_is_the_count_weighted_mean_over_the_split(tmp_path):
    trainer = _trainer(tmp_path, "run")
    task = _scratch_task()
    x, y = task.datasets(3)["val"].tensors
    trainer.model.eval()
    with torch.no_grad():
        logits = trainer.model(x)
    expected_loss = nn.functional.cross_entropy(logits, y).item()
    expected_acc = int((logits.argmax(-1) == y).sum()) / len(y)
    metrics = trainer.evaluate("val")
    assert math.isclose(metrics["val_loss"], expected_loss, rel_tol=1e-5)
    assert math.isclose(metrics["val_acc"], expected_acc, rel_tol=1e-9)
    with pytest.raises(ValueError, match=r"unknown split 'dev'; valid splits: train, val, test"):
        trainer.evaluate("dev")


def test_stop_from_another_thread_saves_and_resume_continues_exactly(tmp_path, fixed_threads):
    straight = _trainer(tmp_path, "straight", steps=80)
    assert straight.fit() == "finished"

    stopped = _trainer(tmp_path, "stopped", steps=80, callbacks=[Recorder(stop_at=33)])
    assert stopped.fit() == "stopped"
    assert stopped.step <= 35 and (tmp_path / "stopped" / "checkpoints" / f"step-{stopped.step:08d}").exists()

    resumed = _trainer(tmp_path, "stopped", steps=80)
    assert resumed.fit(resume=True) == "finished"
    extra_validation = {((stopped.step, "val", m), v) for (key, v) in _entries(tmp_path / "stopped")
                        for m in ("loss", "acc") if key == (stopped.step, "val", m)}
    assert len(extra_validation) == 2  # stopping validates, so its checkpoint records val metrics
    assert [e for e in _entries(tmp_path / "stopped") if e not in extra_validation] == _entries(tmp_path / "straight")
    final = "checkpoints/step-00000080/model.safetensors"
    a, b = load_file(tmp_path / "stopped" / final), load_file(tmp_path / "straight" / final)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_finished_run_ends_with_a_finetuned_checkpoint_that_pruning_keeps(tmp_path):
    manager = wb.CheckpointManager(tmp_path / "run" / "checkpoints", keep_last=1)
    trainer = _trainer(tmp_path, "run", steps=60, checkpoints=manager)
    assert trainer.fit() == "finished"
    table = manager.list()
    assert table[["step", "stage"]].values.tolist() == [[60, "finetuned"]]


def test_a_pissa_run_keeps_its_untrained_state_as_the_svd_init_checkpoint(tmp_path):
    task = _scratch_task()
    base = task.base_model()
    model = wb.add_adapters(task.base_model(), "lora", 4, init="pissa")
    manager = wb.CheckpointManager(tmp_path / "checkpoints", keep_last=1)
    trainer = Trainer(model, task, lr=1e-2, steps=60, eval_every=10, save_every=20, seed=3, checkpoints=manager,
                      progress_bar=False)
    expected = wb.evaluate(base, trainer.loaders["val"], task.loss, task.counts)  # PiSSA leaves outputs as they were
    assert trainer.fit() == "finished"
    table = manager.list()
    assert table[["step", "stage"]].values.tolist() == [[0, "svd-init"], [60, "finetuned"]]
    assert table.loc[0, "val_loss"] == pytest.approx(expected["val_loss"], rel=1e-5)


def test_a_stop_asked_before_fit_starts_is_not_lost(tmp_path):
    trainer = _trainer(tmp_path, "early", steps=80)
    trainer.stop()
    assert trainer.fit() == "stopped" and trainer.step == 1
    assert wb.CheckpointManager(tmp_path / "early" / "checkpoints").list()["step"].tolist() == [1]
    assert trainer.fit(resume=True) == "finished" and trainer.step == 80  # the stop was used up


def test_a_non_finite_loss_stops_training_before_it_is_applied(tmp_path):
    task = _scratch_task()
    calls = {"n": 0}

    def poisoned(outputs, targets):
        calls["n"] += 1 if outputs.requires_grad else 0
        loss = task.loss(outputs, targets)
        return loss * float("nan") if outputs.requires_grad and calls["n"] == 45 else loss

    trainer = _trainer(tmp_path, "run", steps=80, loss=poisoned)
    assert trainer.fit() == "diverged"
    assert "the loss became nan at step 45" in trainer.message and "lower the learning rate" in trainer.message
    assert trainer.step == 44
    steps = wb.CheckpointManager(tmp_path / "run" / "checkpoints").list()["step"].tolist()
    assert steps == [20, 40]
    model = wb.add_adapters(task.base_model(), "lora", 4, dropout=0.1)
    wb.CheckpointManager(tmp_path / "run" / "checkpoints").load(40, model)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_trainer_arguments_are_checked(tmp_path):
    task = _scratch_task()
    model = wb.add_adapters(task.base_model(), "lora", 4)
    with pytest.raises(ValueError, match=r"steps must be an integer >= 1, not 0"):
        Trainer(model, task, steps=0)
    with pytest.raises(ValueError, match=r"loaders need the splits train and val; missing: val"):
        Trainer(model, {"train": task.loaders(0)["train"]})


def test_a_model_without_adapters_trains_checkpoints_and_resumes_exactly(tmp_path, fixed_threads):
    """Full fine-tuning (every parameter trainable, no adapter): what the docstring promises."""
    task = _scratch_task()

    def plain(name: str, steps: int) -> Trainer:
        return Trainer(task.base_model(), task, lr=1e-2, steps=steps, eval_every=10, save_every=10, seed=3,
                       checkpoints=tmp_path / name / "checkpoints", metrics_log=tmp_path / name / "metrics.jsonl",
                       progress_bar=False)

    straight = plain("straight", 40)
    before = {name: p.detach().clone() for name, p in straight.model.named_parameters()}
    assert straight.fit() == "finished"
    assert all(not torch.equal(before[name], p) for name, p in straight.model.named_parameters())  # all trained
    assert plain("cut", 20).fit() == "finished"
    resumed = plain("cut", 40)
    assert resumed.fit(resume=True) == "finished"
    assert _entries(tmp_path / "cut") == _entries(tmp_path / "straight")
    final = "checkpoints/step-00000040/model.safetensors"
    a, b = load_file(tmp_path / "cut" / final), load_file(tmp_path / "straight" / final)
    assert a.keys() == {name for name, _ in straight.model.named_parameters()}
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_after_a_crash_that_cut_the_metrics_log_short(tmp_path, fixed_threads):
    straight = _trainer(tmp_path, "straight", steps=40)
    assert straight.fit() == "finished"
    assert _trainer(tmp_path, "cut", steps=20).fit() == "finished"
    log = tmp_path / "cut" / "metrics.jsonl"
    log.write_text(log.read_text() + '{"step": 21, "split": "tr')  # the crash came mid-line
    resumed = _trainer(tmp_path, "cut", steps=40)
    assert resumed.fit(resume=True) == "finished"
    assert _entries(tmp_path / "cut") == _entries(tmp_path / "straight")
    assert metrics_log.read(log)[-1]["step"] == 40
