"""A variant defined here, in one file, is taken by every part of the workbench with no other edit.

``WideInitLoRA`` is a test-only variant: LoRA whose A starts as ``init_scale`` times the usual
Kaiming-uniform draw, with dropout on by default. It is registered for this module only (the
fixture below), so other test files see the built-in variants alone.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

import pytest
import torch
from conftest import mlp
from peft import PeftModel
from torch import nn

import workbench as wb
from workbench.adapters import AdapterLayer, register, temporary_variant, unregister
from workbench.adapters.lora import LoRA
from workbench.adapters.variant import flag_option, positive_option
from workbench.cli import build_parser, main
from workbench.ui.workbench import Workbench

NAME = "lora-wide-init"
INIT_SCALE_HELP = "multiplies A's Kaiming-uniform draw at initialisation (B starts at zero, so B A = 0 still)"


class WideInitLoRA(LoRA):
    """``"lora-wide-init"``: LoRA with A = ``init_scale`` x its Kaiming-uniform draw; dropout 0.1 by default."""

    name = NAME
    options = {
        "dropout": dataclasses.replace(LoRA.options["dropout"], default=0.1),
        "rslora": LoRA.options["rslora"],
        "init_scale": positive_option(2.0, INIT_SCALE_HELP),
    }

    def build(
        self, bases: Mapping[str, nn.Module], rank: int, alpha: float, options: Mapping[str, Any]
    ) -> dict[str, AdapterLayer]:
        layers = super().build(bases, rank, alpha, options)
        with torch.no_grad():
            for layer in layers.values():
                layer.lora_A.mul_(options["init_scale"])
        return layers


@pytest.fixture(scope="module", autouse=True)
def _registered():
    register(WideInitLoRA)
    yield
    unregister(NAME)


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory):
    """Four-step runs of lora and of the new variant on digits, as ``wb.train`` writes them."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("WORKBENCH_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
        out = tmp_path_factory.mktemp("runs")
        for variant in ("lora", NAME):
            wb.train("digits", variant, 2, out / wb.trial_name(variant, 2, 3e-3, 0), steps=4, eval_every=2,
                     save_every=2, progress_bar=False)
    return out


def test_the_registry_lists_it_with_its_options():
    assert wb.VARIANTS[-1] == NAME and wb.variant_names() == wb.VARIANTS == wb.adapters.VARIANTS
    option = wb.variant_options(NAME)["init_scale"]
    assert (option.default, option.help, option.kind) == (2.0, INIT_SCALE_HELP, float)
    variant = wb.get_variant(NAME)
    assert variant.uses_alpha and variant.reducible and variant.peft_type == "LORA"  # as LoRA's, inherited


def test_add_adapters_and_make_optimizer_take_it(regression):
    x, y = regression
    torch.manual_seed(1)
    lora = wb.add_adapters(mlp(), "lora", 4)
    torch.manual_seed(1)
    model = wb.add_adapters(mlp(), NAME, 4, init_scale=3.0)
    torch.testing.assert_close(model[0].lora_A, 3.0 * lora[0].lora_A, rtol=0, atol=0)
    assert wb.adapter_config(model).options == {"dropout": 0.1, "rslora": False, "init_scale": 3.0}
    model.eval()
    torch.testing.assert_close(model(x), mlp()(x), rtol=0, atol=0)  # B = 0: the base model's outputs
    with pytest.raises(ValueError, match=rf"option init_scale=-1.0 of variant '{NAME}' is invalid: expected a finite"):
        wb.add_adapters(mlp(), NAME, 4, init_scale=-1.0)

    model.train()
    optimizer = wb.make_optimizer(model, lr=0.05)
    assert len(optimizer.param_groups) == 1 and len(optimizer.param_groups[0]["params"]) == 6  # A, B of 3 layers
    losses = []
    for _ in range(20):
        loss = nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]


def test_the_cli_has_its_flag_and_trains_it(tmp_path, capsys):
    parser = build_parser()  # built after registering: the flag and the choice are there
    commands = next(a for a in parser._actions if a.dest == "command")
    train = {action.dest: action for action in commands.choices["train"]._actions}
    assert NAME in train["variant"].choices and NAME in commands.choices["sweep"].get_default("variants")
    flag = train["init_scale"]
    assert flag.option_strings == ["--init-scale"] and flag.default is None
    assert INIT_SCALE_HELP in flag.help and f"({NAME}; default 2)" in flag.help
    assert f"(lora, lora-fa, vera, lora-plus, dora, {NAME}; default 0, 0.1 for {NAME})" in train["dropout"].help
    with pytest.raises(SystemExit):
        main(["train", "--variant", NAME, "--rank", "2", "--out", str(tmp_path / "x"), "--init-scale", "nan"])
    assert "argument --init-scale: must be a finite number, not nan" in capsys.readouterr().err

    run = tmp_path / "run"
    assert main(["train", "--task", "digits", "--variant", NAME, "--rank", "2", "--steps", "4", "--eval-every", "2",
                 "--save-every", "2", "--init-scale", "3", "--out", str(run), "--quiet"]) == 0
    assert wb.run_settings(run)["options"] == {"dropout": 0.1, "rslora": False, "init_scale": 3.0}
    assert wb.load_runs(run).loc[0, "status"] == "finished" and wb.load_runs(run).loc[0, "variant"] == NAME


def test_the_panel_offers_it_with_its_control(tmp_path):
    panel = Workbench("digits", tmp_path / "runs")
    assert NAME in panel.variant.options
    scale, dropout = panel.options["init_scale"], panel.options["dropout"]
    assert scale.tooltip == INIT_SCALE_HELP and scale.layout.display == "none"  # lora is chosen
    panel.variant.value = NAME
    assert scale.layout.display == "" and (scale.value, dropout.value) == (2.0, 0.1)  # this variant's defaults
    panel.variant.value = "lora"
    assert scale.layout.display == "none" and dropout.value == 0.0  # an untouched control follows the default
    dropout.value = 0.05
    panel.variant.value = NAME
    assert dropout.value == 0.05  # an edited one keeps its value

    scale.value = 3.0
    panel.steps.value, panel.eval_every.value, panel.save_every.value, panel.ranks.value = 4, 2, 2, (2,)
    assert panel.launch(), panel.last_error
    (path,) = panel.wait(120)["path"]
    assert wb.run_settings(path)["variant"] == NAME
    assert wb.run_settings(path)["options"] == {"dropout": 0.05, "rslora": False, "init_scale": 3.0}


def test_export_peft_writes_it_as_lora_and_peft_loads_it(tmp_path, regression):
    x, y = regression
    model = wb.add_adapters(mlp(), NAME, 4, targets=["0", "2"])
    optimizer = wb.make_optimizer(model, lr=0.05)
    for _ in range(3):
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    expected = model(x)
    wb.export_peft(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"], config["lora_dropout"]) == ("LORA", 4, 4.0, 0.1)
    loaded = PeftModel.from_pretrained(mlp().eval(), tmp_path).eval()
    # peft computes the same W x + b + s B (A x) in float32, its sums in another order: rounding only
    torch.testing.assert_close(loaded(x), expected, rtol=1e-5, atol=1e-6)
    imported = wb.import_peft(mlp().eval(), tmp_path)  # back as plain lora, the first registered LORA variant
    assert wb.adapter_config(imported).variant == "lora"
    torch.testing.assert_close(imported(x), expected, rtol=1e-5, atol=1e-6)


def test_reduce_rank_takes_it():
    model = wb.add_adapters(mlp(), NAME, 4)
    table = wb.reduce_rank(model, rank=2)
    assert list(table["new_rank"]) == [2, 2, 2] and wb.adapter_config(model).rank == 2


def test_sweep_runs_it(tmp_path):
    table = wb.sweep("digits", variants=[NAME], ranks=[2], steps=4, eval_every=2, save_every=2, out=tmp_path,
                     progress_bar=False)
    assert list(table["variant"]) == [NAME] and list(table["status"]) == ["finished"]


def test_the_report_and_the_figures_include_it(runs_dir, tmp_path):
    report = wb.write_report(runs_dir, tmp_path / "report.html")
    html = report.read_text()
    assert NAME in html and wb.trial_name(NAME, 2, 3e-3, 0) in html
    colors = [wb.plots.variant_color(v) for v in wb.VARIANTS]
    assert len(set(colors)) == len(colors)  # a colour of its own, as every registered variant


def test_an_option_name_has_one_kind_across_variants():
    class Clash(LoRA):
        name = "clash"
        options = {"dropout": flag_option(False, "a switch named like lora's dropout probability")}

    with pytest.raises(TypeError, match=r"option 'dropout' of variant 'clash' is a bool, but variant 'lora' has it "
                                        r"as a float"):
        register(Clash)
    assert "clash" not in wb.VARIANTS
    with pytest.raises(ValueError, match=r"unknown variant 'clash'; valid variants: lora, "):
        unregister("clash")


def test_a_temporary_variant_is_gone_after_its_block():
    class Temporary(LoRA):
        name = "temporary"

    with temporary_variant(Temporary):
        assert wb.VARIANTS[-1] == "temporary"
        assert wb.adapter_config(wb.add_adapters(mlp(), "temporary", 2)).variant == "temporary"
    assert "temporary" not in wb.VARIANTS and wb.VARIANTS[-1] == NAME
