"""The trainer: evaluation and checkpoints as it goes, stop, divergence, callbacks, exact resume."""

from __future__ import annotations

import json
import math
import threading

import pytest
import torch
from conftest import training_log
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
    entries = {(e["step"], e["split"], e["metric"]): e["value"] for e in training_log(_log(run / "metrics.jsonl"))}
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


# -- schedule, clipping, accumulation, precision, validation subset ------------------------------------


def _expected_factor(schedule: str, s: int, warmup: int, steps: int) -> float:
    """The closed form, written out here: a linear warmup from 0 over W steps, then the schedule to 0 at T."""
    if s < warmup:
        return s / warmup
    progress = (s - warmup) / (steps - warmup)
    return {"constant": 1.0, "linear": 1.0 - progress, "cosine": (1.0 + math.cos(math.pi * progress)) / 2}[schedule]


def _train_log(log, metric: str) -> dict[int, float]:
    """A "train" metric of a metrics log, by step."""
    return {e["step"]: e["value"] for e in _log(log) if e["split"] == "train" and e["metric"] == metric}


def _extra(checkpoint) -> dict:
    """A checkpoint's ``extra`` state, as progress.json stores it."""
    return json.loads((checkpoint / "progress.json").read_text())["extra"]


class GroupLrs(Callback):
    """Every group's lr after each step: the lr of the step that follows."""

    def __init__(self) -> None:
        self.after: dict[int, list[float]] = {}

    def on_step(self, trainer, loss):
        self.after[trainer.step] = [group["lr"] for group in trainer.optimizer.param_groups]


@pytest.mark.parametrize(("schedule", "warmup"), [("constant", 5), ("linear", 5), ("cosine", 5), ("cosine", 0)])
def test_the_lr_of_every_step_and_every_group_is_the_formula(tmp_path, schedule, warmup):
    task, steps, lr, ratio = _scratch_task(), 30, 1e-2, 16.0
    model = wb.add_adapters(task.base_model(), "lora-plus", 4, lr_ratio=ratio)  # two groups: A at lr, B at 16 lr
    groups = GroupLrs()
    trainer = Trainer(model, task, lr=lr, steps=steps, eval_every=steps, save_every=steps, seed=3, callbacks=[groups],
                      metrics_log=tmp_path / "metrics.jsonl", progress_bar=False, schedule=schedule,
                      warmup_steps=warmup)
    assert trainer.fit() == "finished"
    logged = _train_log(tmp_path / "metrics.jsonl", "lr")  # step t used the lr of s = t - 1 steps done
    assert sorted(logged) == list(range(1, steps + 1))
    for t, value in logged.items():
        assert value == pytest.approx(lr * _expected_factor(schedule, t - 1, warmup, steps), rel=1e-12, abs=1e-15)
    for t, (lr_a, lr_b) in groups.after.items():  # each group keeps its own base lr
        factor = _expected_factor(schedule, t, warmup, steps)
        assert lr_a == pytest.approx(lr * factor, rel=1e-12, abs=1e-15)
        assert lr_b == pytest.approx(ratio * lr * factor, rel=1e-12, abs=1e-15)
    if warmup:
        assert logged[1] == 0.0 and logged[warmup + 1] == lr  # from 0; the base lr once warmed up
    if schedule != "constant":
        assert groups.after[steps] == [0.0, 0.0]  # decayed to 0 at T


def test_the_schedules_are_transformers_get_scheduler(tmp_path):
    """The same lrs as HF Trainer's schedules (transformers is a dev dependency only)."""
    get_scheduler = pytest.importorskip("transformers").get_scheduler
    steps, warmup = 40, 7
    for ours, theirs in [("constant", "constant_with_warmup"), ("linear", "linear"), ("cosine", "cosine")]:
        task = _scratch_task()
        model = wb.add_adapters(task.base_model(), "lora-plus", 2)
        trainer = Trainer(model, task, lr=3e-3, steps=steps, schedule=ours, warmup_steps=warmup, progress_bar=False)
        params = [nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))]
        reference = torch.optim.SGD([{"params": [params[0]], "lr": 3e-3}, {"params": [params[1]], "lr": 4.8e-2}])
        hf = get_scheduler(theirs, reference, num_warmup_steps=warmup, num_training_steps=steps)
        for _ in range(steps):
            ours_lrs = [g["lr"] for g in trainer.optimizer.param_groups]
            assert ours_lrs == pytest.approx([g["lr"] for g in reference.param_groups], rel=1e-12, abs=1e-15), ours
            trainer.optimizer.step()
            trainer.scheduler.step()
            reference.step()
            hf.step()


def test_resume_is_exact_with_a_schedule_clipping_and_accumulation(tmp_path, fixed_threads):
    settings = {"steps": 60, "schedule": "cosine", "warmup_steps": 8, "max_grad_norm": 0.5, "accumulate": 3}
    straight = _trainer(tmp_path, "straight", **settings)
    assert straight.fit() == "finished"

    stopped = _trainer(tmp_path, "stopped", callbacks=[Recorder(stop_at=23)], **settings)
    assert stopped.fit() == "stopped" and 23 <= stopped.step < 60
    checkpoint = tmp_path / "stopped" / "checkpoints" / f"step-{stopped.step:08d}"
    assert _extra(checkpoint)["scheduler"]["last_epoch"] == stopped.step  # the schedule's state is checkpointed
    resumed = _trainer(tmp_path, "stopped", **settings)
    assert resumed.fit(resume=True) == "finished"

    at_stop = set() if stopped.step % 10 == 0 else {(stopped.step, "val", m) for m in ("loss", "acc")}  # stopping
    assert [e for e in _entries(tmp_path / "stopped") if e[0] not in at_stop] == _entries(tmp_path / "straight")
    final = "checkpoints/step-00000060"
    for name in ("model.safetensors", "optimizer.safetensors"):
        a, b = load_file(tmp_path / "stopped" / final / name), load_file(tmp_path / "straight" / final / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    log = tmp_path / "stopped" / "metrics.jsonl"
    lrs, norms = _train_log(log, "lr"), _train_log(log, "grad_norm")
    assert sorted(lrs) == sorted(norms) == list(range(1, 61))
    assert all(lrs[t] == pytest.approx(1e-2 * _expected_factor("cosine", t - 1, 8, 60), rel=1e-12, abs=1e-15)
               for t in lrs)
    assert min(norms.values()) < 0.5 < max(norms.values())  # clipping bit on some steps, not on others
    assert resumed.epoch == straight.epoch == 5  # 180 batches of 32 batches an epoch


def _plain_model(task: Task) -> nn.Module:
    """The scratch task's model without its dropout, adapted: one forward is one function of the batch."""
    base = task.base_model()
    base[2] = nn.Identity()
    return wb.add_adapters(base, "lora", 4, init="pissa")  # PiSSA: A and B both non-zero, so both get gradients


def _first_batch(task: Task, seed: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    return next(iter(task.loaders(seed)["train"]))


def test_clipping_logs_the_norm_clip_grad_norm_computes_and_scales_the_gradient_to_the_limit(tmp_path):
    import copy

    task = _scratch_task()
    model = _plain_model(task)
    copied = copy.deepcopy(model)
    inputs, targets = _first_batch(task)
    task.loss(copied(inputs), targets).backward()
    grads = {name: p.grad.clone() for name, p in copied.named_parameters() if p.requires_grad}
    by_hand = torch.cat([g.reshape(-1) for g in grads.values()]).double().norm().item()
    norm = torch.nn.utils.clip_grad_norm_([p for p in copied.parameters() if p.requires_grad], by_hand / 4).item()
    assert norm == pytest.approx(by_hand, rel=1e-6)

    lr, limit = 0.1, by_hand / 4
    before = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    trainer = Trainer(model, task, lr=lr, optimizer="sgd", steps=1, seed=3, max_grad_norm=limit,
                      metrics_log=tmp_path / "metrics.jsonl", progress_bar=False)
    assert trainer.fit() == "finished"
    assert _train_log(tmp_path / "metrics.jsonl", "grad_norm")[1] == pytest.approx(norm, rel=1e-6)  # the norm before clipping
    scale = limit / (norm + 1e-6)  # clip_grad_norm_'s coefficient
    clipped = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
    assert torch.cat([g.reshape(-1) for g in clipped.values()]).norm().item() == pytest.approx(limit, rel=1e-5)
    for name, p in model.named_parameters():
        if p.requires_grad:  # SGD: p - lr * (the gradient, clipped)
            torch.testing.assert_close(clipped[name], grads[name] * scale, rtol=1e-5, atol=1e-8)
            torch.testing.assert_close(p.detach(), before[name] - lr * grads[name] * scale, rtol=1e-5, atol=1e-7)


def _sgd_step(model: nn.Module, data: TensorDataset, batch_size: int, accumulate: int, tmp_path, name: str) -> Trainer:
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size)  # not shuffled: micro-batches in order
    trainer = Trainer(model, {"train": loader, "val": loader}, lr=0.1, optimizer="sgd", steps=1, accumulate=accumulate,
                      metrics_log=tmp_path / f"{name}.jsonl", progress_bar=False)
    assert trainer.fit() == "finished"
    return trainer


def test_two_micro_batches_of_16_step_as_one_batch_of_32(tmp_path):
    import copy

    task = _scratch_task()
    model = _plain_model(task)
    x, y = task.datasets(0)["train"].tensors
    data = TensorDataset(x[:32], y[:32])
    accumulated = _sgd_step(copy.deepcopy(model), data, 16, 2, tmp_path, "accumulated")
    whole = _sgd_step(copy.deepcopy(model), data, 32, 1, tmp_path, "whole")
    # The same 32 per-example gradients, summed in another order (two means of 16, each halved, against one
    # mean of 32): equal up to float32 rounding, not bit for bit.
    for (name, a), (_, b) in zip(accumulated.model.named_parameters(), whole.model.named_parameters(), strict=True):
        if a.requires_grad:
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7, msg=name)
            torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-6, atol=1e-7, msg=name)
    losses = [_train_log(tmp_path / f"{n}.jsonl", "loss")[1] for n in ("accumulated", "whole")]
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)  # the mean of the two means is the mean of all 32

    # Micro-batches of unequal size (16, then 8): each weighs alike, so the gradient is the mean of the two
    # micro-batches' mean-loss gradients, not the mean over all 24 targets.
    uneven = _sgd_step(copy.deepcopy(model), TensorDataset(x[:24], y[:24]), 16, 2, tmp_path, "uneven")
    reference = copy.deepcopy(model)
    (task.loss(reference(x[:16]), y[:16]) / 2 + task.loss(reference(x[16:24]), y[16:24]) / 2).backward()
    for (name, a), (_, b) in zip(uneven.model.named_parameters(), reference.named_parameters(), strict=True):
        if a.requires_grad:
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_accumulation_counts_optimizer_steps_and_draws_k_batches_for_each(tmp_path):
    seen = []

    class Batches(Callback):
        def on_step(self, trainer, loss):
            seen.append((trainer.step, trainer.loaders["train"].state_dict()["_num_yielded"]))

    trainer = _trainer(tmp_path, "run", steps=12, accumulate=3, callbacks=[Batches()])
    assert trainer.fit() == "finished" and trainer.step == 12
    assert [step for step, _ in seen] == list(range(1, 13))
    yielded = [n for _, n in seen]  # 1000 examples in batches of 32: 32 batches an epoch, 3 per step
    assert yielded[:10] == [3 * t for t in range(1, 11)] and trainer.epoch == 1
    assert wb.CheckpointManager(tmp_path / "run" / "checkpoints").list()["step"].tolist() == [12]


def test_bf16_autocast_trains_and_the_parameters_stay_float32(tmp_path):
    task = _scratch_task()
    dtypes = set()

    def loss(outputs, targets):
        dtypes.add(outputs.dtype)
        return task.loss(outputs, targets)

    trainer = _trainer(tmp_path, "bf16", steps=60, loss=loss, precision="bf16")
    assert trainer.fit() == "finished"
    assert dtypes == {torch.bfloat16}  # forward ran under autocast, in training and in validation
    val = {e["step"]: e["value"] for e in _log(tmp_path / "bf16" / "metrics.jsonl")
           if e["split"] == "val" and e["metric"] == "loss"}
    assert val[60] < val[10]
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
    assert all(p.grad.dtype == torch.float32 for p in trainer.model.parameters() if p.grad is not None)
    saved = load_file(tmp_path / "bf16" / "checkpoints" / "step-00000060" / "model.safetensors")
    assert {t.dtype for t in saved.values()} == {torch.float32}
    full = wb.evaluate(trainer.model, trainer.loaders["val"], task.loss, task.counts)  # float32: close, not equal
    assert trainer.evaluate("val")["val_loss"] == pytest.approx(full["val_loss"], rel=2e-2)
    assert trainer.evaluate("val")["val_loss"] != full["val_loss"]


def test_eval_batches_validates_on_the_first_batches_of_the_split_every_time(tmp_path):
    trainer = _trainer(tmp_path, "run", steps=20, eval_batches=1)
    assert trainer.fit() == "finished"
    x, y = _scratch_task().datasets(3)["val"].tensors
    size = len(next(iter(trainer.loaders["val"]))[1])  # the val loader's batch size (256): the first of 400
    assert size < len(y)
    trainer.model.eval()
    with torch.no_grad():
        logits = trainer.model(x[:size])
    assert trainer.last_metrics["val_loss"] == pytest.approx(nn.functional.cross_entropy(logits, y[:size]).item(),
                                                             rel=1e-5)
    # the trainer's evaluation and this forward are two code paths over the same batch: a prediction at a near-tie
    # of two logits may fall either way, so they agree within one of the batch's predictions
    assert trainer.last_metrics["val_acc"] == pytest.approx(int((logits.argmax(-1) == y[:size]).sum()) / size,
                                                            abs=1 / size)
    assert trainer.evaluate("val", 1) == trainer.last_metrics and trainer.evaluate("val") != trainer.last_metrics


@pytest.mark.parametrize(("settings", "message"), [
    ({"schedule": "cosin"}, r"unknown schedule 'cosin'; valid schedules: constant, linear, cosine"),
    ({"warmup_steps": -1}, r"warmup_steps must be an integer >= 0, not -1"),
    ({"warmup_steps": 2.5}, r"warmup_steps must be an integer >= 0, not 2.5"),
    ({"schedule": "linear", "warmup_steps": 60}, r"warmup_steps \(60\) must be fewer than steps \(60\) for schedule "
                                                 r"'linear'.*schedule 'constant' may warm up over the whole run"),
    ({"schedule": "cosine", "warmup_steps": 99}, r"warmup_steps \(99\) must be fewer than steps \(60\)"),
    ({"max_grad_norm": 0}, r"max_grad_norm must be a finite number > 0, or None for no clipping, not 0"),
    ({"max_grad_norm": -1.0}, r"max_grad_norm must be a finite number > 0.*not -1.0"),
    ({"max_grad_norm": float("inf")}, r"max_grad_norm must be a finite number > 0.*not inf"),
    ({"max_grad_norm": float("nan")}, r"max_grad_norm must be a finite number > 0.*not nan"),
    ({"max_grad_norm": True}, r"max_grad_norm must be a finite number > 0.*not True"),
    ({"accumulate": 0}, r"accumulate must be an integer >= 1, not 0"),
    ({"accumulate": 2.0}, r"accumulate must be an integer >= 1, not 2.0"),
    ({"precision": "fp16"}, r"unknown precision 'fp16'; valid precisions: float32, bf16"),
    ({"eval_batches": 0}, r"eval_batches must be an integer >= 1, or None for the whole split, not 0"),
])
def test_training_settings_are_checked_naming_the_valid_values(tmp_path, settings, message):
    with pytest.raises(ValueError, match=message):
        _trainer(tmp_path, "run", **settings)


def test_a_constant_schedule_may_warm_up_over_the_whole_run(tmp_path):
    trainer = _trainer(tmp_path, "run", steps=20, warmup_steps=40)
    assert trainer.fit() == "finished"
    assert _train_log(tmp_path / "run" / "metrics.jsonl", "lr")[20] == pytest.approx(1e-2 * 19 / 40, rel=1e-12)  # still warming up


def test_a_checkpoint_without_a_schedule_state_resumes_exactly(tmp_path, fixed_threads):
    """Checkpoints written before schedules existed hold no scheduler state; their lr was constant."""
    assert _trainer(tmp_path, "straight", steps=40).fit() == "finished"
    old = _trainer(tmp_path, "old", steps=20)
    old.scheduler.state_dict = lambda: None  # what such a checkpoint's extra holds: nothing
    assert old.fit() == "finished"
    assert _extra(tmp_path / "old" / "checkpoints" / "step-00000020")["scheduler"] is None
    resumed = _trainer(tmp_path, "old", steps=40)
    assert resumed.fit(resume=True) == "finished"
    assert _entries(tmp_path / "old") == _entries(tmp_path / "straight")
