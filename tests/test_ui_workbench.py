"""The main panel, headless: settings in, runs on disk out, and a figure that shows what was logged."""

from __future__ import annotations

import json
import math
import shlex
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import workbench as wb
from workbench.cli import _run_settings, build_parser
from workbench.cli import main as cli_main
from workbench.ui import workbench as panel_module
from workbench.ui.workbench import RANKS, Workbench, target_groups, target_kind

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


def panel_for(tmp_path, steps=30, task="digits", rank=4, **kwargs) -> Workbench:
    panel = Workbench(task, tmp_path / "runs", **kwargs)
    panel.steps.value, panel.eval_every.value, panel.save_every.value = steps, 5, 10
    panel.ranks.value = (rank,)
    return panel


def trace(panel, name):
    """The live figure's trace of ``"<run> <series>"`` (its meta; the validation loss is named just "<run>")."""
    (found,) = [t for t in panel.figure.data if t.meta == name]
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
    assert panel.variant.options == (*wb.VARIANTS, *wb.BASELINES)
    for variant in wb.VARIANTS:
        panel.variant.value = variant
        shown = {name: control for name, control in panel.options.items() if control.layout.display != "none"}
        options = wb.variant_options(variant)
        assert shown.keys() == options.keys(), variant
        for name, control in shown.items():  # untouched: the variant's default, its help as the tooltip
            assert control.value == options[name].default and control.tooltip == options[name].help
        assert (panel.alpha.layout.display == "none") == (not wb.get_variant(variant).uses_alpha)
    assert panel.alpha.layout.display == "" and panel.variant.value == wb.VARIANTS[-1]
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
    expected = wb.plots.live_runs(names, ["lora", "lora"], [2, 8])  # the panel's figure is plots', filled in
    assert [t.name for t in panel.figure.data] == [t.name for t in expected.data]
    assert [(t.xaxis, t.mode, t.line.color, t.line.dash, t.marker.color) for t in panel.figure.data] == [
        (t.xaxis, t.mode, t.line.color, t.line.dash, t.marker.color) for t in expected.data]
    assert {t.line.color for t in panel.figure.data if t.mode == "lines"} == {wb.plots.variant_color("lora")}
    assert trace(panel, f"{names[0]} val loss").line.dash != trace(panel, f"{names[1]} val loss").line.dash
    assert panel.figure.layout.title.text == expected.layout.title.text


def test_the_live_figure_has_four_empty_traces_per_run_in_the_run_colour():
    figure = wb.plots.live_runs(["a", "b"])
    assert [t.meta for t in figure.data] == [f"{run} {series}" for run in "ab" for series in wb.plots.LIVE_SERIES]
    assert all(t.x is None and t.y is None for t in figure.data)
    colors = [t.marker.color if t.mode == "markers" else t.line.color for t in figure.data]
    assert colors == [wb.plots.run_color(0)] * 4 + [wb.plots.run_color(1)] * 4
    assert [t.name for t in figure.data if t.showlegend] == ["a", "b"]  # one legend entry per run, named by it
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
    (lambda p, t: setattr(p.lr, "value", 0.0), "lr must be a finite number"),  # refused, not clamped
    (lambda p, t: setattr(p.lr, "value", -1e-3), "lr must be a finite number"),
    (lambda p, t: setattr(p.steps, "value", 0), "steps must be an integer"),
    (lambda p, t: setattr(p.eval_every, "value", -5), "eval_every must be an integer"),
    (lambda p, t: setattr(p.save_every, "value", 0), "save_every must be an integer"),
    (lambda p, t: setattr(p.seed, "value", -1), "seed"),
    (lambda p, t: setattr(p.training["warmup_steps"], "value", -1), "warmup_steps must be"),
    (lambda p, t: setattr(p.training["keep_last"], "value", -2), "keep_last"),
    (lambda p, t: setattr(p.training["accumulate"], "value", 0), "accumulate must be an integer"),
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
    panel = panel_for(tmp_path, steps=6, task=task, rank=2)  # the default target is 8 -> 3: rank at most 3
    linear = [name for name, module in task.base_model().named_modules() if isinstance(module, nn.Linear)]
    assert [group.modules for group in panel.target_groups] == [(name,) for name in linear] == [("0",), ("2.0",),
                                                                                               ("3",)]
    # "0" alone would also select "2.0" (a suffix at a dot): the pattern of layer 0 is the regex of its name only
    assert [pattern for _, pattern in panel.targets.options] == ["^0$", "2.0", "3"]
    assert panel.targets.label == ("other: 3 (8→3)",) and panel.targets.value == ("3",)  # the task's default_targets
    assert panel.trained.value.startswith("trained in full: none (adapters only)")
    panel.targets.value = ("2.0", "^0$")
    panel.ranks.value = (2,)
    assert panel.launch()
    (path,) = panel.wait(TIMEOUT)["path"]
    settings = json.loads((tmp_path / "runs" / path / "config.json").read_text())["settings"]
    assert settings["task"] == "tiny" and settings["targets"] == ["^0$", "2.0"] and settings["train"] is None
    model, _ = wb.load_run_model(wb.best_checkpoint(path), task)
    assert [name for name, _ in wb.adapter_layers(model)] == ["0", "2.0"]
    assert trace(panel, f"{Path(path).name} val loss").customdata is None  # no perplexity: the figure as plots draws it
    assert "ppl" not in panel.status.value


# -- targets in groups, what is trained in full, perplexity ------------------------------------------


def groups_of(panel):
    """{kind: [(pattern, number of modules, (in, out) features), ...]} and the default patterns."""
    found = {}
    for group in panel.target_groups:
        found.setdefault(group.kind, []).append((group.pattern, len(group.modules), group.features))
    return found, panel.targets.value


def test_the_sequence_tasks_targets_are_grouped_by_kind_and_the_chosen_patterns_reach_the_run(tmp_path):
    panel = panel_for(tmp_path, steps=4, task="sequence")
    groups, default = groups_of(panel)
    assert groups == {"attention": [(p, 2, (64, 64)) for p in ("q_proj", "k_proj", "v_proj", "o_proj")],
                      "MLP": [("gate_proj", 2, (64, 128)), ("up_proj", 2, (64, 128)), ("down_proj", 2, (128, 64))],
                      "head": [("lm_head", 1, (64, 17))]}
    assert default == ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # the task's
    assert panel.targets.label[0] == "attention: q_proj (2 × 64→64)"
    model = panel.task.base_model()
    for group in panel.target_groups:  # each pattern selects exactly its group, as the library resolves it
        assert tuple(wb.find_targets(model, group.pattern)) == group.modules
    assert panel._settings()[1]["targets"] is None  # the default is passed as the task's default

    panel.targets.value = ("v_proj", "q_proj", "lm_head")
    assert panel.launch()
    (path,) = panel.wait(TIMEOUT)["path"]
    settings = json.loads((tmp_path / "runs" / path / "config.json").read_text())["settings"]
    assert settings["targets"] == ["q_proj", "v_proj", "lm_head"]  # in the control's order
    model, _ = wb.load_run_model(wb.best_checkpoint(path))
    assert [name for name, _ in wb.adapter_layers(model)] == [
        *(f"layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")), "lm_head"]


def test_digits_targets_are_two_mlp_layers_and_a_head(tmp_path):
    panel = panel_for(tmp_path)
    groups, default = groups_of(panel)
    assert groups == {"MLP": [("fc1", 1, (64, 128)), ("fc2", 1, (128, 128))], "head": [("head", 1, (128, 10))]}
    assert default == ("fc1", "fc2", "head")  # default_targets None: every adaptable layer


def test_a_default_that_takes_part_of_a_group_splits_it_into_its_modules():
    task = wb.tasks.get_task("sequence")
    task = wb.Task("partial", task.base_model, task.datasets, default_targets=["layers.1.self_attn.q_proj"])
    groups = target_groups(task)
    assert [(g.pattern, g.modules, g.default) for g in groups[:2]] == [
        ("0.self_attn.q_proj", ("layers.0.self_attn.q_proj",), False),
        ("1.self_attn.q_proj", ("layers.1.self_attn.q_proj",), True)]
    assert [g.pattern for g in groups if g.default] == ["1.self_attn.q_proj"]


@pytest.mark.parametrize("name, kind", [
    ("model.layers.0.self_attn.q_proj", "attention"), ("bert.encoder.layer.3.attention.self.query", "attention"),
    ("bert.encoder.layer.3.attention.output.dense", "attention"), ("transformer.h.0.attn.c_proj", "attention"),
    ("model.layers.0.mlp.down_proj", "MLP"), ("bert.encoder.layer.3.intermediate.dense", "MLP"),
    ("bert.encoder.layer.3.output.dense", "MLP"), ("transformer.h.0.mlp.c_proj", "MLP"), ("fc2", "MLP"),
    ("classifier", "head"), ("lm_head", "head"), ("head", "head"), ("bert.pooler.dense", "other"), ("2.0", "other"),
])
def test_a_modules_kind_comes_from_its_name(name, kind):
    assert target_kind(name) == kind


class CharTokenizer:
    """A tokenizer as the text tasks use one: characters to ids 2..63, 0 pads, 1 ends a text."""

    pad_token_id, eos_token_id = 0, 1

    def __call__(self, texts, truncation=False, max_length=None):
        def encode(text):
            ids = [2 + ord(c) % 62 for c in text]
            return ids[:max_length] if truncation and max_length else ids

        return {"input_ids": [encode(t) for t in texts] if isinstance(texts, list) else encode(texts)}


TEXT = "to be, or not to be, that is the question: whether tis nobler in the mind to suffer. " * 6


def tiny_gpt2_task() -> wb.Task:
    """A causal LM on a 2-block GPT-2 (Conv1D layers, lm_head tied to the embedding), random weights."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=64, n_positions=32, n_embd=16, n_layer=2, n_head=2)
    return wb.tasks.causal_lm((transformers.GPT2LMHeadModel(config), CharTokenizer()), TEXT, block_size=16,
                              batch_size=4, targets=["c_attn"], name="tiny-gpt2")


def tiny_bert_task() -> wb.Task:
    """Text classification on a 2-layer BERT, random weights; its new head ``classifier`` is trained in full."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=64)
    texts = [f"{word} review number {i}" for i in range(20) for word in ("fresh", "rotten")]
    data = pd.DataFrame({"text": texts, "label": [t.split()[0] for t in texts]})
    return wb.tasks.text_classification((transformers.BertModel(config), CharTokenizer()), data, max_length=32,
                                        batch_size=8, targets=["query", "value"], name="tiny-bert")


def test_a_bert_classifiers_groups_leave_its_head_to_train_in_full_and_a_launch_records_both(tmp_path):
    panel = panel_for(tmp_path, steps=3, task=tiny_bert_task())
    groups, default = groups_of(panel)
    output = r"bert\.encoder\.layer\.\d+\.output\.dense"  # "output.dense" would take the attention's too
    assert groups == {
        "attention": [(p, 2, (16, 16)) for p in ("query", "key", "value", "attention.output.dense")],
        "MLP": [("intermediate.dense", 2, (16, 32)), (output, 2, (32, 16))],
        "other": [("pooler.dense", 1, (16, 16))],
    }  # no head: the classifier is trained in full (default_train), so it is no target
    assert default == ("query", "value")
    assert "MLP: bert.encoder.layer.*.output.dense (2 × 32→16)" in [label for label, _ in panel.targets.options]
    assert panel.trained.value.startswith("trained in full: <code>classifier</code> (the task's default)")

    panel.targets.value = ("key", output)
    assert panel.launch()
    (path,) = panel.wait(TIMEOUT)["path"]
    settings = json.loads((tmp_path / "runs" / path / "config.json").read_text())["settings"]
    assert settings["targets"] == ["key", output] and settings["train"] == ["classifier"]
    model, _ = wb.load_run_model(wb.best_checkpoint(path), panel.task)
    assert [name for name, _ in wb.adapter_layers(model)] == [
        f"bert.encoder.layer.{i}.{part}" for i in range(2) for part in ("attention.self.key", "output.dense")]
    assert wb.adapter_config(model).train == ("classifier",)


def test_a_language_models_perplexity_is_in_the_status_line_and_the_figures_hover(tmp_path, monkeypatch):
    monkeypatch.setattr(panel_module, "DRAW_INTERVAL", 0.0)  # draw on every step, so the peek sees step 6's status
    seen = {}

    class PeekStatus(wb.Callback):
        def on_step(self, trainer, loss):
            seen.setdefault(trainer.step, panel.status.value)

    panel = panel_for(tmp_path, steps=10, task=tiny_gpt2_task(), callbacks=[PeekStatus()])
    groups, default = groups_of(panel)  # Conv1D layers (in, out); lm_head is tied to the embedding: no target
    assert groups == {"attention": [("c_attn", 2, (16, 48)), ("attn.c_proj", 2, (16, 16))],
                      "MLP": [("c_fc", 2, (16, 64)), ("mlp.c_proj", 2, (64, 16))]}
    assert default == ("c_attn",)
    assert panel.launch()
    (path,) = panel.wait(TIMEOUT)["path"]
    assert "val_ppl" not in seen[5] and "val_ppl" in seen[6]  # validated at step 5
    metrics = wb.load_metrics(tmp_path / "runs" / path)
    val = metrics[metrics["split"] == "val"].pivot(index="step", columns="metric", values="value")
    shown = trace(panel, f"{Path(path).name} val loss")
    np.testing.assert_allclose(shown.customdata, val["ppl"])
    np.testing.assert_allclose(shown.customdata, np.exp(val["loss"]), rtol=1e-6)
    assert "val ppl %{customdata" in shown.hovertemplate
    assert f"val_ppl {val['ppl'].loc[5]:.4g}" in seen[6]
    test = json.loads((tmp_path / "runs" / path / "config.json").read_text())["test"]
    assert f"test ppl {test['test_ppl']:.4g}" in panel.status.value and math.isfinite(test["test_ppl"])

    again = panel_for(tmp_path, steps=10, task=panel.task)  # a finished run, drawn from disk, has its perplexity too
    assert not again.launch()
    np.testing.assert_allclose(trace(again, f"{Path(path).name} val loss").customdata, val["ppl"])


def test_the_reviews_panel_lists_seven_groups_and_trains_the_classifier_in_full(tmp_path):
    # hamlet's groups (q/k/v/o_proj, gate/up/down_proj, 30 layers each) are not tested here: with a fresh
    # cache, tokenizing its text takes a minute; its names are those of the sequence task's model
    try:
        panel = panel_for(tmp_path, task="reviews")
    except wb.tasks.PackagedFileError as error:
        pytest.skip(str(error))
    groups, default = groups_of(panel)
    output = r"bert\.encoder\.layer\.\d+\.output\.dense"
    assert groups == {
        "attention": [(p, 6, (384, 384)) for p in ("query", "key", "value", "attention.output.dense")],
        "MLP": [("intermediate.dense", 6, (384, 1536)), (output, 6, (1536, 384))],
        "other": [("pooler.dense", 1, (384, 384))],
    }
    assert default == ("query", "key", "value") and panel._settings()[1]["targets"] is None
    assert panel.trained.value.startswith("trained in full: <code>classifier</code> (the task's default)")


def test_only_the_ranks_the_chosen_targets_allow_are_offered(tmp_path):
    panel = panel_for(tmp_path)
    assert "head (128→10)" in [label for label, _ in panel.targets.options][2]  # each target with its shape
    assert panel.ranks.options == (1, 2, 4, 8)  # digits' head is 128 -> 10: rank at most 10
    panel.targets.value = ("fc1", "fc2")
    assert panel.ranks.options == RANKS and panel.ranks.value == (4,)  # 64 -> 128 and 128 -> 128 allow them all
    panel.ranks.value = (4, 64)
    panel.targets.value = ("head",)
    assert panel.ranks.value == (4,)  # the rank the head cannot take is dropped, the other kept
    panel.variant.value = "vera"  # VeRA's rank is not limited by the layer (a shared random projection)
    assert panel.ranks.options == RANKS


def test_the_training_settings_reach_the_run_and_the_cli_command_trains_the_same_runs(tmp_path):
    panel = panel_for(tmp_path, steps=12)
    panel.variant.value = "lora"
    panel.options["rslora"].value, panel.options["dropout"].value = True, 0.1
    panel.ranks.value = (2, 4)
    for name, value in {"optimizer": "adam", "schedule": "cosine", "warmup_steps": 2, "max_grad_norm": 1.0,
                        "monitor": "val_acc", "keep_last": 1, "keep_best": 1, "eval_batches": 2}.items():
        panel.training[name].value = value
    panel.command_button.click()
    assert panel.command.layout.display == "" and panel.command.value == panel.command_line()
    assert panel.last_error is None
    words = shlex.split(panel.command.value)
    assert words[:2] == ["workbench", "sweep"]
    args = build_parser().parse_args(words[1:])  # the CLI's own parser reads it back
    assert (args.variants, args.ranks, args.lrs, args.seeds, args.steps, args.out) == (
        ["lora"], [2, 4], [3e-3], [0], 12, tmp_path / "runs")
    ranks, settings = panel._settings()
    read = _run_settings(args)
    assert {name: read[name] for name in settings if name in read} == {
        name: value for name, value in settings.items() if name in read}
    assert (read["rslora"], read["dropout"]) == (True, 0.1)

    assert panel.launch()
    table = panel.wait(TIMEOUT)
    assert list(table["status"]) == ["finished", "finished"]
    recorded = wb.run_settings(tmp_path / "runs" / table["run"].iloc[0])
    assert {key: recorded[key] for key in ("optimizer", "schedule", "warmup_steps", "max_grad_norm", "monitor",
                                           "keep_last", "keep_best", "eval_batches", "mode")} == {
        "optimizer": "adam", "schedule": "cosine", "warmup_steps": 2, "max_grad_norm": 1.0, "monitor": "val_acc",
        "keep_last": 1, "keep_best": 1, "eval_batches": 2, "mode": "max"}
    assert recorded["options"] == {"rslora": True, "dropout": 0.1, "init": "default"}
    before = sorted(path.name for path in (tmp_path / "runs").iterdir())
    assert cli_main(words[1:]) == 0  # the command finds the panel's runs, same settings, finished: nothing to do
    assert sorted(path.name for path in (tmp_path / "runs").iterdir()) == before
    assert wb.load_runs(tmp_path / "runs")["wall_time"].tolist() == table["wall_time"].tolist()


def test_a_stored_panel_shows_a_static_picture_instead_of_the_widget_repr(tmp_path):
    panel = panel_for(tmp_path)
    bundle = panel._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in bundle  # the live panel, where widgets render
    assert bundle["text/plain"].startswith("Workbench panel.") and "VBox" not in bundle["text/plain"]
    picture = bundle["text/html"]
    assert "<script" not in picture and "<button disabled>Launch</button>" in picture
    assert "steps: <b>30</b>" in picture and "rank(s): <b>4</b>" in picture  # each control with its value
    assert panel.status.value in picture
    assert "lr_ratio" not in picture  # the options of other variants are hidden, and left out
