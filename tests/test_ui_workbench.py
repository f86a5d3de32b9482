"""The main panel, headless: settings in, runs on disk out, and a figure that shows what was logged."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import workbench as wb
from workbench.ui.workbench import Workbench

TIMEOUT = 120  # seconds; a bound for a hang, not a timing check


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


class StopAt(wb.Callback):
    """Presses the panel's Stop once, at ``step``."""

    def __init__(self, step: int) -> None:
        self.step, self.panel = step, None

    def on_step(self, trainer, loss):
        if trainer.step == self.step:
            self.panel.stop()


class Peek(wb.Callback):
    """What the panel shows right after step 1, seen from the training thread."""

    def __init__(self) -> None:
        self.panel, self.seen = None, None

    def on_step(self, trainer, loss):
        if trainer.step == 1:
            shown = [t for t in self.panel.figure.data if t.name.endswith("train loss")][0]
            self.seen = (list(shown.x), list(shown.y), self.panel.progress.value, self.panel.status.value)


class Fail(wb.Callback):
    def on_step(self, trainer, loss):
        if trainer.step == 3:
            raise RuntimeError("boom at step 3")


def panel_for(tmp_path, steps=30, task="digits", **kwargs) -> Workbench:
    panel = Workbench(task, tmp_path / "runs", **kwargs)
    panel.steps.value, panel.eval_every.value, panel.save_every.value = steps, 5, 10
    panel.ranks.value = (4,)
    return panel


def trace(panel, name):
    (found,) = [t for t in panel.figure.data if t.name == name]
    return found


def run_dirs(tmp_path):
    root = tmp_path / "runs"
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


def test_a_launch_trains_in_the_background_and_the_figure_holds_the_logged_values(tmp_path):
    peek = Peek()
    panel = peek.panel = panel_for(tmp_path, callbacks=[peek])
    assert panel.runs.empty and not panel.running
    assert panel.launch()
    table = panel.wait(TIMEOUT)
    name = wb.trial_name("lora", 4, 3e-3, 0)
    x, y, progress, status = peek.seen  # drawn live: the first step is on screen before the second begins
    assert (x, progress) == ([1], 1) and "step 1 / 30" in status
    assert list(table["run"]) == [name] and list(table["status"]) == ["finished"]
    assert "finished" in panel.status.value and panel.last_error is None and not panel.running
    assert (panel.progress.value, panel.progress.max) == (30, 30)

    saved = wb.CheckpointManager(tmp_path / "runs" / name / "checkpoints").list()
    assert list(saved["step"]) == [10, 20, 30]
    metrics = wb.load_metrics(tmp_path / "runs" / name)
    for series, split, metric in [("train loss", "train", "loss"), ("val loss", "val", "loss"),
                                  ("val acc", "val", "acc")]:
        logged = metrics[(metrics["split"] == split) & (metrics["metric"] == metric)]
        shown = trace(panel, f"{name} {series}")
        np.testing.assert_array_equal(shown.x, logged["step"])
        np.testing.assert_allclose(shown.y, logged["value"])
    assert y == [metrics[metrics["split"] == "train"]["value"].iloc[0]]
    val_loss = metrics[(metrics["split"] == "val") & (metrics["metric"] == "loss")].set_index("step")["value"]
    markers = trace(panel, f"{name} checkpoints")
    np.testing.assert_array_equal(markers.x, saved["step"])
    np.testing.assert_allclose(markers.y, val_loss.loc[saved["step"]])
    np.testing.assert_allclose(markers.y, saved["val_loss"])  # what each checkpoint recorded
    assert list(panel.runs["run"]) == [name]

    assert not panel.launch()  # identical settings again: reported as done, nothing trained
    assert "already finished" in panel.status.value and panel.last_error is None
    assert len(trace(panel, f"{name} train loss").x) == 30  # drawn from disk
    assert "application/vnd.jupyter.widget-view+json" in panel._repr_mimebundle_()


def test_variant_options_are_shown_only_for_their_variant_and_reach_the_run(tmp_path):
    panel = panel_for(tmp_path, steps=5)
    assert panel.variant.options == wb.VARIANTS
    for variant in wb.VARIANTS:
        panel.variant.value = variant
        shown = {name: control for name, control in panel.options.items() if control.layout.display != "none"}
        options = wb.variant_options(variant)
        assert shown.keys() == options.keys(), variant
        for name, control in shown.items():  # untouched: the variant's default, its help as the tooltip
            assert control.value == options[name].default and control.tooltip == options[name].help
        assert (panel.alpha.layout.display == "none") == (not wb.get_variant(variant).uses_alpha)
    assert panel.alpha.layout.display == "" and panel.variant.value == "lora-plus"
    assert type(panel.options["rslora"]).__name__ == "Checkbox"
    assert type(panel.options["delta_start"]).__name__ == "IntText"
    assert type(panel.options["lr_ratio"]).__name__ == "FloatText"
    panel.variant.value = "delta-lora"
    panel.options["delta_lambda"].value, panel.options["lr_ratio"].value = 0.25, 2.0  # lr_ratio is not delta-lora's
    panel.alpha.value = 8
    assert panel.launch()
    (path,) = panel.wait(TIMEOUT)["path"]
    settings = json.loads((tmp_path / "runs" / path / "config.json").read_text())["settings"]
    # every option of the variant recorded, the defaults made explicit (wb.Run resolves them), lr_ratio not among them
    assert settings["options"] == {"rslora": False, "delta_lambda": 0.25, "delta_start": 0, "init": "default"}
    assert settings["alpha"] == 8 and settings["targets"] is None  # every module = the task's default


def test_init_is_a_choice_of_the_lora_family_and_a_pissa_launch_records_it(tmp_path):
    panel = panel_for(tmp_path, steps=5)
    init = panel.options["init"]
    assert list(init.options) == ["default", "pissa"] and init.value == "default"
    shown = []
    for variant in wb.VARIANTS:
        panel.variant.value = variant
        if init.layout.display != "none":
            shown.append(variant)
    assert shown == [v for v in wb.VARIANTS if "init" in wb.variant_options(v)] == ["lora", "lora-fa", "delta-lora",
                                                                                    "lora-plus"]
    for variant in shown:  # the choices are exactly those the library takes
        for choice in init.options:
            model = wb.add_adapters(wb.tasks.get_task("digits").base_model(), variant, 2, init=choice)
            assert wb.adapter_config(model).options["init"] == choice
        with pytest.raises(ValueError, match="expected 'default' or 'pissa'"):
            wb.add_adapters(wb.tasks.get_task("digits").base_model(), variant, 2, init="svd")

    panel.variant.value = "lora"
    assert panel.launch()  # "default": recorded as the default it is
    (path,) = panel.wait(TIMEOUT)["path"]
    assert json.loads((tmp_path / "runs" / path / "config.json").read_text())["settings"]["options"]["init"] == "default"

    init.value = "pissa"  # a run of its own beside the default one (wb.trial_name names the init)
    assert panel.launch()
    (path,) = panel.wait(TIMEOUT)["path"]
    assert path.endswith("-pissa") and len(panel.runs) == 2
    settings = json.loads((tmp_path / "runs" / path / "config.json").read_text())["settings"]
    assert settings["options"]["init"] == "pissa" and panel.last_error is None
    assert wb.load_checkpoints(path)["stage"].tolist()[0] == "svd-init"
    model, _ = wb.load_run_model(wb.best_checkpoint(path))
    assert {layer.init for _, layer in wb.adapter_layers(model)} == {"pissa"}


def test_two_ranks_make_two_runs(tmp_path):
    panel = panel_for(tmp_path, steps=20)
    panel.ranks.value = (2, 8)
    panel.lr.value, panel.seed.value = 1e-2, 3
    panel.launch_button.click()  # the button does what launch() does
    table = panel.wait(TIMEOUT)
    assert panel.last_error is None and not panel.launch_button.disabled and panel.stop_button.disabled
    names = [wb.trial_name("lora", r, 1e-2, 3) for r in (2, 8)]
    assert sorted(table["run"]) == names == run_dirs(tmp_path)
    assert sorted(table["rank"]) == [2, 8] and set(table["status"]) == {"finished"}
    assert len(panel.figure.data) == 8
    for name in names:
        assert len(trace(panel, f"{name} train loss").x) == 20
    expected = wb.plots.live_runs(names)  # the panel's figure is plots', its points filled in
    assert [t.name for t in panel.figure.data] == [t.name for t in expected.data]
    assert [(t.xaxis, t.mode, t.line.color, t.marker.color) for t in panel.figure.data] == [
        (t.xaxis, t.mode, t.line.color, t.marker.color) for t in expected.data]
    assert panel.figure.layout.title.text == expected.layout.title.text


def test_the_live_figure_has_four_empty_traces_per_run_in_the_run_colour():
    figure = wb.plots.live_runs(["a", "b"])
    assert [t.name for t in figure.data] == [f"{run} {series}" for run in "ab" for series in wb.plots.LIVE_SERIES]
    assert all(t.x is None and t.y is None for t in figure.data)
    colors = [t.marker.color if t.mode == "markers" else t.line.color for t in figure.data]
    assert colors == [wb.plots.run_color(0)] * 4 + [wb.plots.run_color(1)] * 4
    assert [t.name for t in figure.data if t.showlegend] == ["a val loss", "b val loss"]  # one legend entry per run
    assert [t.xaxis for t in figure.data[:4]] == ["x", "x", "x2", "x"]  # accuracy on the right
    assert wb.plots.live_runs([]).data == ()


def test_stop_saves_a_checkpoint_and_launching_again_resumes_to_the_end(tmp_path):
    stop = StopAt(7)
    panel = panel_for(tmp_path, callbacks=[stop])
    stop.panel = panel
    name = wb.trial_name("lora", 4, 3e-3, 0)
    assert panel.launch()
    table = panel.wait(TIMEOUT)
    assert list(table["status"]) == ["stopped"] and list(table["steps_done"]) == [7]
    assert "stopped at step 7" in panel.status.value
    assert list(wb.CheckpointManager(tmp_path / "runs" / name / "checkpoints").list()["step"]) == [7]

    assert panel.launch()  # the same settings: resumes from step 7
    table = panel.wait(TIMEOUT)
    assert list(table["status"]) == ["finished"] and list(table["steps_done"]) == [30]
    assert list(wb.CheckpointManager(tmp_path / "runs" / name / "checkpoints").list()["step"]) == [7, 10, 20, 30]
    np.testing.assert_array_equal(trace(panel, f"{name} train loss").x, np.arange(1, 31))  # history kept, no repeats
    metrics = wb.load_metrics(tmp_path / "runs" / name)
    val = metrics[(metrics["split"] == "val") & (metrics["metric"] == "loss")]
    np.testing.assert_array_equal(trace(panel, f"{name} val loss").x, val["step"])
    np.testing.assert_array_equal(trace(panel, f"{name} checkpoints").x, [7, 10, 20, 30])

    panel.steps.value = 40  # same directory name, different run
    assert not panel.launch()
    assert "holds a different run" in panel.status.value and "steps" in panel.last_error


def test_stop_right_after_launch_and_a_second_launch_is_refused(tmp_path):
    panel = panel_for(tmp_path, steps=5000)
    panel.ranks.value = (2, 4)
    panel.stop()
    assert "nothing is running" in panel.status.value
    assert panel.launch()
    assert not panel.launch()
    assert "going already" in panel.status.value and "going already" in panel.last_error
    panel.stop_button.click()
    table = panel.wait(TIMEOUT)
    first, second = (wb.trial_name("lora", r, 3e-3, 0) for r in (2, 4))
    assert list(table["run"]) == [first] and list(table["status"]) == ["stopped"]
    (step,) = table["steps_done"]
    assert 1 <= step < 5000
    assert step in set(wb.CheckpointManager(tmp_path / "runs" / first / "checkpoints").list()["step"])
    assert "stopped" in panel.status.value and f"{second} not started" in panel.status.value
    assert run_dirs(tmp_path) == [first]  # the rank never started leaves no directory


@pytest.mark.parametrize("change, message", [
    (lambda p, t: setattr(p.ranks, "value", ()), "at least one rank"),
    (lambda p, t: setattr(p.targets, "value", ()), "at least one target"),
    (lambda p, t: setattr(p.alpha, "value", -1.0), "alpha"),
    (lambda p, t: setattr(p.alpha, "value", float("nan")), "alpha"),
    (lambda p, t: setattr(p.ranks, "value", (2, 64)), "rank 64 is larger"),  # the first rank is fine
    (lambda p, t: (p.variant.__setattr__("value", "lora-plus"), p.options["lr_ratio"].__setattr__("value", -2.0)),
     "lr_ratio"),
    (lambda p, t: (t / "runs").write_text("not a directory"), "not a directory"),
])
def test_invalid_choices_are_refused_in_the_status_line_and_write_nothing(tmp_path, change, message):
    panel = panel_for(tmp_path)
    change(panel, tmp_path)
    assert not panel.launch()
    assert message in panel.last_error and message in panel.status.value and "not launched" in panel.status.value
    assert not panel.running
    assert (tmp_path / "runs").is_file() or run_dirs(tmp_path) == []


def test_an_error_on_the_training_thread_is_shown_not_raised(tmp_path):
    panel = panel_for(tmp_path, callbacks=[Fail()])
    assert panel.launch()
    table = panel.wait(TIMEOUT)
    assert list(table["status"]) == ["failed"]
    assert "RuntimeError: boom at step 3" in panel.last_error and "boom" in panel.status.value
    assert not panel.running and not panel.launch_button.disabled and panel.stop_button.disabled


def _tiny_task() -> wb.Task:
    def base_model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Sequential(nn.Linear(8, 8), nn.Tanh()), nn.Linear(8, 3))

    def datasets(seed):
        generator = torch.Generator().manual_seed(seed)
        x = torch.randn(96, 4, generator=generator)
        y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
        return {"train": TensorDataset(x[:64], y[:64]), "val": TensorDataset(x[64:80], y[64:80]),
                "test": TensorDataset(x[80:], y[80:])}

    return wb.Task("tiny", base_model, datasets, default_targets=["3"], batch_size=16)


def test_a_users_task_lists_its_linear_modules_as_targets(tmp_path):
    task = _tiny_task()
    panel = panel_for(tmp_path, steps=6, task=task)
    linear = [name for name, module in task.base_model().named_modules() if isinstance(module, nn.Linear)]
    assert list(panel.targets.options) == linear == ["0", "2.0", "3"]
    assert panel.targets.value == ("3",)  # the task's default_targets
    panel.targets.value = ("2.0", "0")
    panel.ranks.value = (2,)
    assert panel.launch()
    (path,) = panel.wait(TIMEOUT)["path"]
    settings = json.loads((tmp_path / "runs" / path / "config.json").read_text())["settings"]
    assert settings["task"] == "tiny" and settings["targets"] == ["0", "2.0"]
    model, _ = wb.load_run_model(wb.best_checkpoint(path), task)
    assert [name for name, _ in wb.adapter_layers(model)] == ["0", "2.0"]
