"""Runs, sweeps and selection on the built-in digits task, checked against independent numbers."""

from __future__ import annotations

import json
import time

import pytest
import torch
from conftest import training_metrics
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
    metrics = training_metrics(wb.load_metrics(tmp_path / "sweep"))
    assert metrics.equals(training_metrics(wb.load_metrics(tmp_path / "reference")))


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
    # Recorded on the reduced model in memory, re-measured on the checkpoint loaded from disk: the same
    # tensors, contiguous in both, so the figures agree to float32 rounding of the mean over the split.
    assert runs.loc["reduced", "best_value"] == pytest.approx(wb.evaluate_checkpoint(reduced)["val_loss"], rel=1e-6)
    assert runs.loc["reduced", "test_loss"] == pytest.approx(wb.evaluate_checkpoint(reduced, "test")["test_loss"],
                                                             rel=1e-6)
    assert runs.loc["reduced", "test_acc"] == pytest.approx(wb.evaluate_checkpoint(reduced, "test")["test_acc"])

    with pytest.raises(ValueError, match="holds a run already"):
        wb.reduce_checkpoint(full, tmp_path / "reduced", rank=1)
    with pytest.raises(ValueError, match="exactly one of rank"):
        wb.reduce_checkpoint(full, tmp_path / "none")
    assert not (tmp_path / "none").exists()



# -- defects found by trying to break it ------------------------------------------------------------


def _strict_json(path) -> dict:
    def refuse(constant):
        raise AssertionError(f"{path} holds {constant}, which is not JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


def test_a_run_monitoring_accuracy_keeps_and_tests_its_most_accurate_checkpoint(tmp_path):
    run = wb.train("digits", "lora", 4, tmp_path / "run", steps=60, lr=3e-2, monitor="val_acc", keep_best=1,
                   keep_last=1, eval_every=10, save_every=10, progress_bar=False)
    record = _strict_json(run / "config.json")
    assert record["settings"]["mode"] == "max"  # inferred from the monitor's name
    accuracies = {e["step"]: e["value"] for e in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
                  if e["split"] == "val" and e["metric"] == "acc"}
    best_step = max(accuracies, key=lambda step: (accuracies[step], -step))  # the first of the most accurate
    kept = wb.CheckpointManager(run / "checkpoints").list()["step"].tolist()
    assert best_step in kept and kept == sorted({best_step, 60})  # the best and the newest, nothing else
    table = wb.load_runs(run)
    assert table.loc[0, "best_step"] == best_step and record["test"]["step"] == best_step
    assert wb.best_checkpoint(run, "val_acc") == run / "checkpoints" / f"step-{best_step:08d}"


def test_a_monitor_that_is_never_recorded_fails_at_the_first_evaluation_naming_the_metrics(tmp_path):
    with pytest.raises(ValueError, match=r"monitor 'val_f1' is not recorded: an evaluation records val_loss, val_acc"):
        wb.train("digits", "lora", 2, tmp_path / "run", steps=20, monitor="val_f1", **FAST)
    assert wb.load_runs(tmp_path / "run").loc[0, "status"] == "failed"
    assert not list((tmp_path / "run" / "checkpoints").iterdir())  # it failed before any checkpoint


@pytest.mark.parametrize(("settings", "message"), [
    ({"lr": -1.0}, r"lr must be a finite number > 0, not -1.0"),
    ({"lr": float("nan")}, r"lr must be a finite number > 0, not nan"),
    ({"lr": float("inf")}, r"lr must be a finite number > 0, not inf"),
    ({"optimizer": "lion"}, r"unknown optimizer 'lion'; valid optimizers: adamw, adam, sgd"),
    ({"steps": 0}, r"steps must be an integer >= 1, not 0"),
    ({"seed": 2**64}, r"seed must be an integer from 0 to 2\*\*63 - 1, not 18446744073709551616"),
    ({"seed": -1}, r"seed must be an integer from 0 to 2\*\*63 - 1, not -1"),
    ({"mode": "lowest"}, r"mode must be 'min' \(lower is better\) or 'max'"),
    ({"targets": 5}, r"targets must be None, a non-empty string or a non-empty list of them, not 5"),
])
def test_a_rejected_run_says_why_and_leaves_no_directory(tmp_path, settings, message):
    with pytest.raises((ValueError, TypeError), match=message):
        wb.Run("digits", "lora", 2, tmp_path / "runs" / "new", **{**FAST, **settings})
    assert not (tmp_path / "runs").exists()


def test_resume_compares_resolved_settings_so_an_explicit_default_is_the_same_run(tmp_path):
    run = wb.train("digits", "lora", 4, tmp_path / "run", steps=20, **FAST)
    same = wb.Run("digits", "lora", 4, run, steps=20, alpha=4.0, dropout=0.0, rslora=False, init="default",
                  mode="min", resume=True, **FAST)
    assert same.finished  # the finished run, recognised: nothing to train
    with pytest.raises(ValueError, match=r"differs in alpha: 4.0 there, 8.0 here"):
        wb.Run("digits", "lora", 4, run, steps=20, alpha=8.0, resume=True, **FAST)


def test_one_unreadable_run_record_does_not_hide_the_others(tmp_path):
    wb.train("digits", "lora", 2, tmp_path / "good", steps=20, **FAST)
    for name, text in [("cut", '{"settings": {"task": "dig'), ("list", "[1, 2]"), ("bare", '{"status": "finished"}')]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(text)
    with pytest.warns(UserWarning) as caught:
        table = wb.load_runs(tmp_path)
    assert table["run"].tolist() == ["good"]
    assert sorted(str(w.message).split(":")[0] for w in caught) == [f"skipping run {n}" for n in ("bare", "cut", "list")]
    assert "bare/config.json: not a run record" in str(caught[0].message)
    with pytest.warns(UserWarning) as caught:
        assert wb.best_checkpoint(tmp_path) == wb.best_checkpoint(tmp_path / "good")
    assert len(caught) == 3 and all(str(w.message).startswith("skipping run") for w in caught)
    with pytest.raises(ValueError, match=r"cut/config.json: not readable as JSON"):
        wb.load_runs(tmp_path / "cut")


@pytest.mark.parametrize(("arguments", "error", "message"), [
    ({"variants": "lora"}, TypeError, r"variants must be a list, e.g. variants=\['lora'\], not 'lora'"),
    ({"variants": []}, ValueError, r"variants is empty: give at least one"),
    ({"ranks": []}, ValueError, r"ranks is empty"),
    ({"ranks": 4}, TypeError, r"ranks must be a list"),
    ({"seeds": []}, ValueError, r"seeds is empty"),
    ({"lrs": 0.01}, TypeError, r"lrs must be a list"),
])
def test_sweep_refuses_a_single_value_or_an_empty_list(tmp_path, arguments, error, message):
    with pytest.raises(error, match=message):
        wb.sweep("digits", out=tmp_path / "runs", steps=10, **{**FAST, **arguments})
    assert not (tmp_path / "runs").exists()


def test_records_are_strict_json(tmp_path):
    run = wb.train("digits", "vera", 2, tmp_path / "run", steps=20, **FAST)
    assert _strict_json(run / "config.json")["settings"]["options"]["d_initial"] == 0.1
    for line in (run / "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=lambda constant: pytest.fail(f"metrics.jsonl holds {constant}"))


def test_runs_of_a_users_own_task_load_with_the_task_and_say_so_without_it(tmp_path):
    digits = get_task("digits")
    mine = wb.tasks.Task("my-digits", digits.base_model, digits.datasets, batch_size=32)
    run = wb.train(mine, "lora", 2, tmp_path / "mine", steps=20, **FAST)
    best = wb.best_checkpoint(run)
    with pytest.raises(ValueError, match=r"trained on task 'my-digits', which is not built in .* pass that "
                                         r"wb.tasks.Task as task=\.\.\."):
        load_run_model(best)
    with pytest.raises(ValueError, match=r"trained on task 'my-digits', not 'digits'"):
        load_run_model(best, digits)
    model, progress = load_run_model(best, mine)
    assert progress["path"] == str(best)
    recorded = wb.load_checkpoints(run).set_index("path").loc[str(best), "val_loss"]
    # the checkpoint's recorded val_loss was measured on the model in training's process; this one is rebuilt
    assert wb.evaluate_checkpoint(best, "val", mine)["val_loss"] == pytest.approx(recorded, rel=1e-6)
    assert set(wb.spectrum(best, mine)["layer"]) == {name for name, _ in wb.adapter_layers(model)}
    browser = wb.ui.CheckpointBrowser(run, task=mine)
    browser.select(best)
    browser.evaluate()
    assert browser.evaluation["val_loss"] == pytest.approx(recorded, rel=1e-6)


# -- the trainer's settings: schedule, clipping, accumulation, precision, validation subset ----------------

TRAINING = {"schedule": "cosine", "warmup_steps": 4, "max_grad_norm": 1.0, "accumulate": 2, "precision": "bf16",
            "eval_batches": 1}


def test_a_run_records_its_trainer_settings_and_a_resume_must_match_them(tmp_path):
    run = wb.train("digits", "lora", 2, tmp_path / "run", steps=20, **TRAINING, **FAST)
    record = _strict_json(run / "config.json")
    assert {k: record["settings"][k] for k in TRAINING} == TRAINING and record["status"] == "finished"
    metrics = wb.load_metrics(run)
    train = metrics[metrics["split"] == "train"]
    assert sorted(set(train["metric"])) == ["grad_norm", "loss", "lr"]
    assert all(train[train["metric"] == m]["step"].tolist() == list(range(1, 21)) for m in ("grad_norm", "loss", "lr"))
    assert wb.Run("digits", "lora", 2, run, steps=20, resume=True, **TRAINING, **FAST).finished
    for key, other, shown in [("schedule", "linear", "'cosine' there, 'linear' here"),
                              ("accumulate", 4, "2 there, 4 here"), ("max_grad_norm", None, "1.0 there, None here"),
                              ("precision", "float32", "'bf16' there, 'float32' here")]:
        with pytest.raises(ValueError, match=rf"holds a different run; it differs in {key}: {shown}"):
            wb.Run("digits", "lora", 2, run, steps=20, resume=True, **{**TRAINING, key: other}, **FAST)


def test_a_record_from_before_the_trainer_settings_is_the_run_with_their_defaults(tmp_path):
    run = wb.train("digits", "lora", 2, tmp_path / "run", steps=20, **FAST)
    record = json.loads((run / "config.json").read_text())
    for key in TRAINING:
        del record["settings"][key]
    (run / "config.json").write_text(json.dumps(record))
    assert wb.Run("digits", "lora", 2, run, steps=20, resume=True, **FAST).finished
    with pytest.raises(ValueError, match=r"differs in schedule: 'constant' there, 'cosine' here"):
        wb.Run("digits", "lora", 2, run, steps=20, resume=True, schedule="cosine", **FAST)


@pytest.mark.parametrize(("settings", "message"), [
    ({"schedule": "cosin"}, r"unknown schedule 'cosin'; valid schedules: constant, linear, cosine"),
    ({"schedule": "linear", "warmup_steps": 20}, r"warmup_steps \(20\) must be fewer than steps \(20\)"),
    ({"max_grad_norm": 0.0}, r"max_grad_norm must be a finite number > 0"),
    ({"accumulate": 0}, r"accumulate must be an integer >= 1, not 0"),
    ({"precision": "fp16"}, r"unknown precision 'fp16'; valid precisions: float32, bf16"),
    ({"eval_batches": 0}, r"eval_batches must be an integer >= 1"),
])
def test_a_run_with_a_bad_trainer_setting_says_why_and_leaves_no_directory(tmp_path, settings, message):
    with pytest.raises(ValueError, match=message):
        wb.Run("digits", "lora", 2, tmp_path / "runs" / "new", steps=20, **{**FAST, **settings})
    assert not (tmp_path / "runs").exists()


def test_a_sweep_passes_the_trainer_settings_to_every_run(tmp_path):
    table = wb.sweep("digits", ["lora", "vera"], [2], steps=10, out=tmp_path / "runs", schedule="linear",
                     warmup_steps=2, accumulate=2, **FAST)
    assert table["status"].tolist() == ["finished", "finished"]
    for run in table["run"]:
        settings = _strict_json(tmp_path / "runs" / run / "config.json")["settings"]
        assert (settings["schedule"], settings["warmup_steps"], settings["accumulate"]) == ("linear", 2, 2)


def test_a_run_trains_a_module_in_full_records_it_and_its_checkpoints_rebuild_it(tmp_path):
    run = wb.train("digits", "lora", 2, tmp_path / "run", steps=20, targets=["fc1", "fc2"], train=["head"], **FAST)
    settings = wb.run_settings(run)
    assert settings["train"] == ["head"] and settings["targets"] == ["fc1", "fc2"]
    base = get_task("digits").base_model()
    model, _ = load_run_model(wb.best_checkpoint(run))
    assert not torch.equal(model.head.weight, base.head.weight)  # the head trained, and the checkpoint kept it
    assert torch.equal(model.fc1.base_layer.weight, base.fc1.weight)  # the adapted layers' W did not
    assert wb.adapter_config(model).train == ("head",)
    with pytest.raises(ValueError, match=r"differs in train: \['head'\] there, None here"):
        wb.Run("digits", "lora", 2, run, steps=20, targets=["fc1", "fc2"], resume=True, **FAST)


def test_checkpoints_are_evaluated_again_in_the_precision_they_were_trained_and_recorded_in(tmp_path):
    run = wb.train("digits", "lora", 2, tmp_path / "bf16", steps=20, precision="bf16", **FAST)
    best = wb.best_checkpoint(run)
    recorded = wb.load_checkpoints(run).set_index("path").loc[str(best), "val_loss"]
    # recorded in the training process, re-measured on the checkpoint loaded into a rebuilt model: the same
    # bf16 kernels on the same tensors, so they agree to float rounding of the split's mean (a float32
    # re-evaluation would differ by bf16's ~3 significant digits)
    assert wb.evaluate_checkpoint(best)["val_loss"] == pytest.approx(recorded, rel=1e-5)


def test_a_record_from_before_the_trainer_settings_existed_reads_with_their_defaults(tmp_path):
    run = wb.train("digits", "lora", 2, tmp_path / "old", steps=20, **FAST)
    record = json.loads((run / "config.json").read_text())
    for key in ("train", "schedule", "warmup_steps", "max_grad_norm", "accumulate", "precision", "eval_batches"):
        del record["settings"][key]
    (run / "config.json").write_text(json.dumps(record))
    assert wb.run_settings(run)["precision"] == "float32" and wb.run_settings(run)["train"] is None
    assert wb.evaluate_checkpoint(wb.best_checkpoint(run))["val_loss"] > 0
    assert wb.Run("digits", "lora", 2, run, steps=20, resume=True, **FAST).finished  # the same run, resolved


def test_a_run_records_the_part_of_its_wall_time_spent_evaluating_over_resumes(tmp_path, monkeypatch):
    spent: list[float] = []
    evaluate = wb.Trainer.evaluate

    def timed(self, *args, **kwargs):  # every validation, timed independently of the trainer
        start = time.perf_counter()
        metrics = evaluate(self, *args, **kwargs)
        spent.append(time.perf_counter() - start)
        return metrics

    monkeypatch.setattr(wb.Trainer, "evaluate", timed)

    class Stop(Callback):
        def on_step(self, trainer, loss):
            if trainer.step == 10:
                trainer.stop()

    run = wb.train("digits", "lora", 2, tmp_path / "run", steps=20, eval_every=5, save_every=10,
                   progress_bar=False, callbacks=[Stop()])
    first = json.loads((run / "config.json").read_text())
    assert len(spent) == 2 and sum(spent) <= first["eval_time"] < first["wall_time"]
    wb.train("digits", "lora", 2, run, steps=20, eval_every=5, save_every=10, progress_bar=False, resume=True)
    record = json.loads((run / "config.json").read_text())
    assert len(spent) == 4 and sum(spent) <= record["eval_time"] < record["wall_time"]
    assert record["eval_time"] - first["eval_time"] >= sum(spent[2:])  # the resume's share is added, and the test's
    assert wb.load_runs(run).loc[0, "eval_time"] == record["eval_time"]


def test_a_run_records_the_bytes_autograd_saved_on_its_first_batch_and_keeps_them_over_resumes(tmp_path):
    task = get_task("digits")

    class Stop(Callback):
        def on_step(self, trainer, loss):
            if trainer.step == 10:
                trainer.stop()

    first = wb.Run(task, "lora", 4, tmp_path / "run", steps=20, seed=3, callbacks=[Stop()], **FAST).fit()
    # measured apart: the same run's model, untrained, on the first batch of the seed's training loader
    model = wb.Run(task, "lora", 4, tmp_path / "other", steps=20, seed=3, **FAST).model.train()
    inputs, targets = next(iter(task.loaders(3)["train"]))
    with wb.saved_activations(model) as saved:
        task.loss(model(inputs), targets)
    assert first["status"] == "stopped" and first["saved_bytes"] == saved.bytes > 0
    resumed = wb.Run(task, "lora", 4, tmp_path / "run", steps=20, seed=3, resume=True, **FAST).fit()
    assert resumed["status"] == "finished" and resumed["saved_bytes"] == saved.bytes
    assert wb.load_runs(tmp_path / "run").loc[0, "saved_bytes"] == saved.bytes


def test_a_merged_export_loads_into_the_base_model_and_no_export_overwrites_a_directory(tmp_path):
    from safetensors.torch import load_model

    run = tmp_path / "run"
    wb.train("digits", "lora", 2, run, steps=6, eval_every=3, save_every=3, progress_bar=False)
    best = wb.best_checkpoint(run)
    ours, _ = wb.load_run_model(best)
    merged = wb.export_checkpoint(best, tmp_path / "merged", "merged")
    assert sorted(path.name for path in merged.iterdir()) == ["model.safetensors"]
    task = wb.tasks.get_task("digits")
    plain = task.base_model()
    load_model(plain, merged / "model.safetensors")  # strict: the base model's own names and shapes
    images, _ = next(iter(task.loaders(0)["val"]))
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(images), ours.eval()(images), rtol=1e-5, atol=1e-5)  # merge rounding

    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    for format in wb.runs.EXPORT_FORMATS:
        with pytest.raises(ValueError, match="not an empty directory"):
            wb.export_checkpoint(best, taken, format)
    assert [path.name for path in taken.iterdir()] == ["notes.txt"]
    with pytest.raises(ValueError, match="valid formats: peft: .*merged: "):
        wb.export_checkpoint(best, tmp_path / "other", "onnx")
