"""The baselines "full" and "head" as runs and sweep trials on digits, checked against independent numbers."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import training_metrics
from torch import nn

import workbench as wb
from workbench.baselines import is_baseline, prepare_baseline
from workbench.runs import layout, load_run_model
from workbench.tasks import get_task
from workbench.trainer import Callback

FAST = {"eval_every": 10, "save_every": 10, "progress_bar": False}
BASE = ("fc1", "fc2")  # the digits MLP below its head


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def _record(run) -> dict:
    return json.loads((run / "config.json").read_text())


def _independent_eval(model: nn.Module, split: str) -> float:
    x, y = zip(*get_task("digits").datasets(0)[split], strict=True)
    model.eval()
    with torch.no_grad():
        return nn.functional.cross_entropy(model(torch.stack(x)), torch.stack(y)).item()


def test_baselines_are_not_variants():
    assert set(wb.BASELINES) == {"full", "head"} and not set(wb.BASELINES) & set(wb.VARIANTS)
    assert all(is_baseline(name) for name in wb.BASELINES) and not is_baseline("lora") and not is_baseline(None)
    assert wb.trial_name("full", None, 5e-5, 0) == "full-lr5e-05-s0"
    assert wb.trial_name("lora", 8, 3e-3, 1) == "lora-r8-lr0.003-s1"


def test_full_trains_every_parameter_and_its_checkpoints_rebuild_the_whole_model(tmp_path):
    run = wb.Run("digits", "full", None, tmp_path / "full", steps=20, lr=1e-3, **FAST)
    assert all(p.requires_grad for p in run.model.parameters())
    record = run.fit()
    base = get_task("digits").base_model()
    assert record["trainable"] == sum(p.numel() for p in base.parameters())
    assert {k: record["settings"][k] for k in ("rank", "alpha", "targets", "train", "options")} == {
        "rank": None, "alpha": None, "targets": None, "train": None, "options": {}}

    newest = wb.CheckpointManager(run.path / "checkpoints").list()["path"].iloc[-1]
    model, progress = load_run_model(newest)
    assert progress["step"] == 20
    trained = dict(run.model.named_parameters())
    for name, param in model.named_parameters():  # every parameter moved, and the checkpoint holds it exactly
        assert torch.equal(param, trained[name]), name
        assert not torch.equal(param, dict(base.named_parameters())[name]), name
    best = wb.best_checkpoint(run.path)
    loaded, _ = load_run_model(best)
    assert wb.evaluate_checkpoint(best)["val_loss"] == pytest.approx(_independent_eval(loaded, "val"), rel=1e-5)
    assert wb.load_runs(tmp_path).loc[0, "test_loss"] == pytest.approx(_independent_eval(loaded, "test"), rel=1e-5)


def test_head_trains_exactly_the_head_and_leaves_the_base_bitwise_unchanged(tmp_path):
    run = wb.train("digits", "head", None, tmp_path / "head", steps=20, lr=1e-2, train=["head"], **FAST)
    base = get_task("digits").base_model()
    record = _record(run)
    assert record["trainable"] == sum(p.numel() for p in base.head.parameters()) == 128 * 10 + 10
    assert record["settings"]["train"] == ["head"] and record["settings"]["rank"] is None
    model, _ = load_run_model(wb.best_checkpoint(run))
    for name in BASE:
        assert torch.equal(model.get_submodule(name).weight, base.get_submodule(name).weight)
        assert torch.equal(model.get_submodule(name).bias, base.get_submodule(name).bias)
    assert not torch.equal(model.head.weight, base.head.weight)
    assert [name for name, p in model.named_parameters() if p.requires_grad] == ["head.weight", "head.bias"]


def test_prepare_baseline_resolves_train_patterns_as_add_adapters_does():
    base = get_task("digits").base_model()
    prepared = prepare_baseline(get_task("digits").base_model(), "head", [r"fc\d"])
    assert {n for n, p in prepared.named_parameters() if p.requires_grad} == {
        f"{m}.{p}" for m in BASE for p in ("weight", "bias")}
    with pytest.raises(ValueError, match=r"train pattern 'nope' matches no module"):
        prepare_baseline(base, "head", ["nope"])
    assert all(p.requires_grad for p in base.parameters())  # refused: the model is as it was


@pytest.mark.parametrize(("variant", "rank", "settings", "message"), [
    ("head", None, {}, r"baseline 'head' trains only the train= modules .* none are given .* train=\[\.\.\.\] of "
                       r"the model's modules \(fc1, act1, fc2, act2, head\)"),
    ("full", 4, {}, r"baseline 'full' .* has no rank: .* Pass rank=None .* not 4"),
    ("head", 2, {"train": ["head"]}, r"baseline 'head' .* has no rank"),
    ("full", None, {"alpha": 8.0}, r"has no alpha: .* Leave alpha=None, not 8.0"),
    ("full", None, {"dropout": 0.1, "init": "pissa"}, r"takes no options: .* \(dropout, init given\)"),
    ("head", None, {"targets": ["fc1"], "train": ["head"]}, r"has no targets: .* name the modules to train with"),
    ("full", None, {"train": ["head"]}, r"trains every parameter, so train= has nothing to choose"),
    ("lora", None, {}, r"variant 'lora' needs a rank, an integer >= 1; only the baselines \(full, head\)"),
])
def test_a_refused_baseline_run_says_why_and_leaves_no_directory(tmp_path, variant, rank, settings, message):
    with pytest.raises(ValueError, match=message):
        wb.Run("digits", variant, rank, tmp_path / "runs" / "new", steps=10, **FAST, **settings)
    assert not (tmp_path / "runs").exists()


def test_a_sweep_runs_a_baseline_once_per_lr_and_seed_with_its_own_learning_rates(tmp_path):
    lrs = {"lora": [1e-2], "full": [1e-3, 1e-4], "head": [1e-2]}
    table = wb.sweep("digits", ["lora", "full", "head"], [2, 4], steps=5, out=tmp_path / "runs", lrs=lrs,
                     seeds=[0, 1], train=["head"], targets=["fc1"], alpha=4.0, **FAST)
    expected = {f"lora-r{r}-lr0.01-s{s}" for r in (2, 4) for s in (0, 1)} | {
        f"full-lr{lr:g}-s{s}" for lr in (1e-3, 1e-4) for s in (0, 1)} | {f"head-lr0.01-s{s}" for s in (0, 1)}
    assert set(table["run"]) == expected and len(table) == 4 + 4 + 2  # baselines not multiplied by ranks
    assert (table["status"] == "finished").all()
    for _, row in table.iterrows():
        settings = _record(tmp_path / "runs" / row["run"])["settings"]
        assert settings["lr"] in lrs[row["variant"]]
        if row["variant"] == "lora":  # the adapter settings went to the adapters only
            assert settings["rank"] in (2, 4) and (settings["alpha"], settings["targets"]) == (4.0, ["fc1"])
        else:
            assert (settings["rank"], settings["alpha"], settings["targets"], settings["options"]) == (None, None,
                                                                                                     None, {})
            assert settings["train"] == (["head"] if row["variant"] == "head" else None)
    # baselines have no adapters: the effective ranks of a sweep's directory are the adapters' runs only
    assert set(wb.spectrum_over_checkpoints(tmp_path / "runs")["run"]) == {r for r in expected if r.startswith("lora")}


@pytest.mark.parametrize(("arguments", "message"), [
    ({"variants": ["lora", "adalora"]}, r"unknown variant 'adalora'; valid variants: lora, lora-fa, .*; valid baselines: "
                                     r"full, head"),
    ({"variants": ["lora", "full"], "lrs": {"lora": [1e-2]}}, r"lrs .* has none for full: give every variant"),
    ({"variants": ["full"], "lrs": {"full": [1e-3], "lora": [1e-2]}}, r"lrs names 'lora', which the sweep does not"),
    ({"variants": ["full"], "lrs": {"full": []}}, r"lrs\['full'\] is empty"),
    ({"variants": ["lora", "head"]}, r"baseline 'head' trains only the train= modules"),  # digits has no head default
    ({"variants": ["full", "head"], "train": ["head"], "alpha": 2.0, "dropout": 0.1},
     r"alpha, dropout: settings of adapters, and the sweep trains only the baselines full, head"),
])
def test_a_sweep_refuses_bad_baselines_and_learning_rates_before_anything_trains(tmp_path, arguments, message):
    with pytest.raises(ValueError, match=message):
        wb.sweep("digits", out=tmp_path / "runs", steps=5, **{**FAST, **arguments})
    assert not (tmp_path / "runs").exists()


class Interrupt(Callback):
    def on_step(self, trainer, loss):
        if trainer.step == 25:
            raise KeyboardInterrupt


def test_an_interrupted_and_resumed_full_run_equals_an_uninterrupted_one_bitwise(tmp_path, fixed_threads):
    settings = {"steps": 40, "lr": 1e-3, "keep_last": 2, **FAST}
    reference = wb.Run("digits", "full", None, tmp_path / "reference", **settings)
    reference.fit()
    with pytest.raises(KeyboardInterrupt):
        wb.Run("digits", "full", None, tmp_path / "run", callbacks=[Interrupt()], **settings).fit()
    assert _record(tmp_path / "run")["status"] == "failed"
    resumed = wb.Run("digits", "full", None, tmp_path / "run", resume=True, **settings)
    resumed.fit()
    assert resumed.trainer.step == 40
    expected = reference.model.state_dict()
    for name, tensor in resumed.model.state_dict().items():
        assert torch.equal(tensor, expected[name]), name
    columns = ["step", "split", "metric", "value"]
    assert training_metrics(wb.load_metrics(tmp_path / "run"))[columns].equals(
        training_metrics(wb.load_metrics(tmp_path / "reference"))[columns])
    runs = wb.load_runs(tmp_path).set_index("run")
    assert runs.loc["run", "test_loss"] == runs.loc["reference", "test_loss"]


def test_operations_that_need_adapters_refuse_a_baseline_run_and_name_what_works(tmp_path):
    run = wb.train("digits", "full", None, tmp_path / "full", steps=10, lr=1e-3, **FAST)
    best = wb.best_checkpoint(run)
    works = r"run full is the baseline 'full' .* it has no adapters, so {}.*\. .* wb\.load_run_model\(checkpoint\)"
    with pytest.raises(ValueError, match=works.format("there is no adapter to export in PEFT's format")):
        wb.export_checkpoint(best, tmp_path / "peft")
    with pytest.raises(ValueError, match=works.format("there is no adapter to reduce to a lower rank")):
        wb.reduce_checkpoint(best, tmp_path / "reduced", rank=1)
    for operation in (wb.spectrum, wb.effective_rank):
        with pytest.raises(ValueError, match=works.format("there is no adapter update to take the spectrum")):
            operation(best)
    with pytest.raises(ValueError, match=works.format("there are no adapter updates")):
        wb.spectrum_over_checkpoints(run)
    assert not (tmp_path / "peft").exists() and not (tmp_path / "reduced").exists()


def test_a_run_records_its_peak_resident_memory_the_largest_over_resumes(tmp_path, monkeypatch):
    run = wb.train("digits", "lora", 2, tmp_path / "run", steps=10, **FAST)
    peak = _record(run)["peak_rss"]
    measurable = peak is not None
    if measurable:  # Linux with /proc/self/clear_refs: at least torch and the model, well under a terabyte
        assert 2**20 < peak < 2**40
    assert wb.load_runs(run).loc[0, "peak_rss"] == peak or not measurable

    class Stop(Callback):
        def on_step(self, trainer, loss):
            if trainer.step == 5:
                trainer.stop()

    for earlier in (2**50, 1):  # a larger figure from before the resume is kept; a smaller one is not
        path = tmp_path / f"resumed-{earlier}"
        wb.train("digits", "full", None, path, steps=10, callbacks=[Stop()], **FAST)
        record = _record(path)
        assert record["status"] == "stopped"
        record["peak_rss"] = earlier
        layout.write_record(path, record)
        wb.train("digits", "full", None, path, steps=10, resume=True, **FAST)
        peak = _record(path)["peak_rss"]
        if earlier > 1 or not measurable:
            assert peak == earlier
        else:
            assert 2**20 < peak < 2**40


def test_the_cli_trains_and_sweeps_baselines(tmp_path, capsys):
    from workbench.cli import main

    assert main(["train", "--variant", "full", "--out", str(tmp_path / "full"), "--steps", "5", "--lr", "1e-3",
                 "--eval-every", "5", "--save-every", "5", "--quiet"]) == 0
    line = capsys.readouterr().out.splitlines()[1].split()
    assert line[:3] == ["full", "full", "-"]  # run, variant, no rank
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--variant", "lora", "--out", str(tmp_path / "x")])
    assert exit_.value.code == 2
    assert "--rank is required for variant 'lora' (only the baselines full, head take none)" in capsys.readouterr().err
    assert main(["sweep", "--variants", "full,head,lora", "--ranks", "2,4", "--train", "head", "--steps", "5",
                 "--eval-every", "5", "--save-every", "5", "--out", str(tmp_path / "runs"), "--quiet"]) == 0
    assert sorted(wb.load_runs(tmp_path / "runs")["run"]) == [
        "full-lr0.003-s0", "head-lr0.003-s0", "lora-r2-lr0.003-s0", "lora-r4-lr0.003-s0"]


def test_the_panel_offers_the_baselines_after_the_variants_and_ignores_the_rank_for_them(tmp_path):
    panel = wb.ui.Workbench("digits", tmp_path / "runs")
    assert tuple(panel.variant.options) == (*wb.VARIANTS, *wb.BASELINES)
    panel.steps.value, panel.eval_every.value, panel.save_every.value = 5, 5, 5
    panel.ranks.value = (2, 4)
    panel.variant.value = "full"
    assert panel.ranks.disabled and panel.targets.disabled and panel.alpha.layout.display == "none"
    assert all(control.layout.display == "none" for control in panel.options.values())
    assert panel.launch(), panel.last_error
    table = panel.wait(120)
    assert list(table["run"]) == ["full-lr0.003-s0"] and table.loc[0, "status"] == "finished"
    panel.variant.value = "head"  # digits has no default head: refused in the status line, nothing written
    assert not panel.launch() and "train=[...]" in panel.last_error
    panel.variant.value = "lora"
    assert not panel.ranks.disabled and not panel.targets.disabled


def test_full_fine_tuning_checkpoints_the_running_statistics_too():
    from torch import nn

    from workbench.checkpoints.snapshot import changed_tensors

    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    model(torch.randn(8, 3))  # the running statistics move
    saved = changed_tensors(model)
    assert {"1.running_mean", "1.running_var", "1.num_batches_tracked"} <= set(saved)
    assert torch.equal(saved["1.running_mean"], model[1].running_mean)
    model[1].requires_grad_(False)  # a frozen normalisation keeps its statistics out
    assert "1.running_mean" not in changed_tensors(model)
