"""Compression by truncated SVD (``wb.compress``) and its three stage runs (``wb.compress_task``).

The independent reference is numpy's SVD in float64 of each original weight: the kept energy,
the smallest sufficient rank and the truncation error are computed from its singular values.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from conftest import mlp
from torch import nn
from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel, GPT2Model

import workbench as wb
from workbench.checkpoints import stages

IDS = torch.randint(0, 50, (2, 10), generator=torch.Generator().manual_seed(0))


def bert() -> nn.Module:
    torch.manual_seed(0)
    return BertModel(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=64)).eval()


def gpt2() -> nn.Module:
    torch.manual_seed(0)
    return GPT2Model(GPT2Config(vocab_size=50, n_embd=32, n_layer=2, n_head=4, n_positions=16)).eval()


def _weights(model: nn.Module) -> dict[str, np.ndarray]:
    """Every linear layer's W (out, in) in float64, Conv1D's stored (in, out) transposed."""
    found = {}
    for name, module in model.named_modules():
        if wb.adapters.is_conv1d(module):
            found[name] = module.weight.detach().double().numpy().T
        elif isinstance(module, nn.Linear):
            found[name] = module.weight.detach().double().numpy()
    return found


def _energy(values: np.ndarray, rank: int) -> float:
    return float((values[:rank] ** 2).sum() / (values ** 2).sum())


@pytest.mark.parametrize("build", [bert, gpt2], ids=["bert-linear", "gpt2-conv1d"])
def test_full_rank_factors_give_the_original_outputs(build):
    model = build()
    expected = model(IDS).last_hidden_state
    table = wb.compress(model)
    assert table["factored"].all() and (table["error"] == 0).all()
    assert len(wb.compressed_ranks(model)) == len(table) > 0
    # the product of two float32 factors instead of one matrix: rounding of float32 only
    torch.testing.assert_close(model(IDS).last_hidden_state, expected, rtol=1e-4, atol=1e-5)


def test_the_truncation_error_is_the_tail_of_the_singular_values():
    model = gpt2()
    original = _weights(model)
    table = wb.compress(model, rank=5).set_index("layer")
    for name, weight in original.items():
        values = np.linalg.svd(weight, compute_uv=False)
        layer = model.get_submodule(name)
        product = layer.weight_product().detach().double().numpy()
        tail = math.sqrt((values[5:] ** 2).sum() / (values ** 2).sum())
        measured = np.linalg.norm(weight - product) / np.linalg.norm(weight)
        assert measured == pytest.approx(tail, rel=1e-4), name  # float32 factors against a float64 SVD
        assert table.loc[name, "error"] == pytest.approx(tail, rel=1e-4)
        assert table.loc[name, "energy"] == pytest.approx(_energy(values, 5), rel=1e-5)
        out, in_ = weight.shape
        assert table.loc[name, "params_after"] == 5 * (out + in_) + out  # the factors and the bias


@pytest.mark.parametrize("energy", [0.5, 0.8, 0.95])
def test_energy_keeps_the_smallest_sufficient_rank_and_dense_where_factors_do_not_save(energy):
    model = bert()
    original = _weights(model)
    table = wb.compress(model, energy=energy).set_index("layer")
    for name, weight in original.items():
        values = np.linalg.svd(weight, compute_uv=False)
        needed = next(k for k in range(1, len(values) + 1) if _energy(values, k) >= energy - 1e-6)
        out, in_ = weight.shape
        if needed * (out + in_) < out * in_:
            assert table.loc[name, "rank"] == needed, name
            assert _energy(values, needed - 1) < energy + 1e-6 if needed > 1 else True
            assert isinstance(model.get_submodule(name), wb.LowRankLinear)
        else:
            assert pd_isna(table.loc[name, "rank"]) and not table.loc[name, "factored"], name
            assert isinstance(model.get_submodule(name), nn.Linear)


def pd_isna(value) -> bool:
    import pandas as pd

    return bool(pd.isna(value))


def test_a_fixed_rank_stays_dense_where_it_would_not_save():
    model = mlp()  # 12 -> 16 -> 16 -> 6: rank 6 saves on 16 x 16 (6 x 32 < 256), not on 6 x 16 (6 x 22 > 96)
    table = wb.compress(model, rank=6).set_index("layer")
    assert table.loc["2", "rank"] == 6 and pd_isna(table.loc["4", "rank"])
    assert isinstance(model[4], nn.Linear) and isinstance(model[2], wb.LowRankLinear)


def test_a_parameter_budget_is_kept_and_filled_largest_singular_values_first():
    model = gpt2()
    total = sum(p.numel() for p in model.parameters())
    budget = int(total * 0.8)
    original = _weights(model)
    table = wb.compress(model, params=budget).set_index("layer")
    used = sum(p.numel() for p in model.parameters())
    assert used <= budget
    for name, weight in original.items():
        out, in_ = weight.shape
        rank = table.loc[name, "rank"]
        if not pd_isna(rank):  # one more singular value of this layer no longer fits
            more = (out + in_) if (rank + 1) * (out + in_) < out * in_ else out * in_ - rank * (out + in_)
            assert used + more > budget, name
    kept = [np.linalg.svd(original[n], compute_uv=False)[int(r) - 1] for n, r in table["rank"].dropna().items()]
    dropped = [np.linalg.svd(original[n], compute_uv=False)[int(r)] for n, r in table["rank"].dropna().items()]
    assert min(kept) >= min(dropped)  # the smallest value kept is no smaller than every value dropped


def test_a_compressed_model_is_truncated_further_and_rebuilds_from_its_ranks():
    model = gpt2()
    dense = copy.deepcopy(model)
    wb.compress(model)
    wb.compress(model, energy=0.7)
    rebuilt = wb.compress(copy.deepcopy(dense), ranks=wb.compressed_ranks(model))
    assert rebuilt["factored"].all()
    direct = copy.deepcopy(dense)
    wb.compress(direct, energy=0.7)
    assert wb.compressed_ranks(direct) == wb.compressed_ranks(model)
    # the SVD of the full-rank product against the SVD of W: the same truncation within float32 rounding
    torch.testing.assert_close(model(IDS).last_hidden_state, direct(IDS).last_hidden_state, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"rank": 2, "energy": 0.5}, r"give one of rank, energy, params or ranks, not rank and energy"),
    ({"energy": 1.5}, r"energy must be a number in \(0, 1\]"),
    ({"rank": 0}, r"rank must be an integer >= 1, not 0"),
    ({"params": 10}, r"a budget of 10 parameters is too small: the model's other parameters and rank 1"),
    ({"targets": ["nothing"]}, r"nothing"),
])
def test_bad_input_is_refused_and_the_model_is_unchanged(kwargs, message):
    model = mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        wb.compress(model, **kwargs)
    assert all(isinstance(model[i], nn.Linear) for i in (0, 2, 4))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_tied_weights_and_adapted_models_are_refused():
    torch.manual_seed(0)
    lm = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=32, n_layer=1, n_head=4, n_positions=16))
    with pytest.raises(ValueError, match="lm_head"):
        wb.compress(lm, targets=["lm_head"])
    table = wb.compress(lm)  # targets=None skips the tied head, as the adapters do
    assert "lm_head" not in set(table["layer"]) and lm.lm_head.weight is lm.transformer.wte.weight
    with pytest.raises(ValueError, match="adapters"):
        wb.compress(wb.add_adapters(mlp(), "lora", 2), rank=2)


FAST = {"eval_every": 25, "save_every": 25, "progress_bar": False}


@pytest.fixture(scope="module")
def stage_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("compressed") / "digits"
    table = wb.compress_task("digits", out, energy=0.6, steps=100, lr=3e-3, keep_last=1, keep_best=1, **FAST)
    return out, table


def test_three_stage_runs_the_svd_stage_is_the_original_and_recovery_improves(stage_runs):
    out, table = stage_runs
    assert list(table["stage"]) == [stages.SVD, stages.RANK_REDUCED, stages.FINETUNED]
    rows = table.set_index("stage")
    frozen = wb.frozen_metrics("digits", 0)
    # the factorised model against the dense one: float32 rounding of the product
    assert rows.loc[stages.SVD, "test_loss"] == pytest.approx(frozen["test_loss"], rel=1e-5)
    # the same predictions but where float32 rounding of the product flips one near a tie
    tested = len(wb.tasks.get_task("digits").datasets(0)["test"])
    assert rows.loc[stages.SVD, "test_acc"] == pytest.approx(frozen["test_acc"], abs=1.5 / tested)
    assert rows.loc[stages.RANK_REDUCED, "parameters"] < rows.loc[stages.SVD, "parameters"]
    assert rows.loc[stages.FINETUNED, "parameters"] == rows.loc[stages.RANK_REDUCED, "parameters"]
    assert rows.loc[stages.FINETUNED, "val_loss"] < rows.loc[stages.RANK_REDUCED, "val_loss"]
    runs = wb.load_runs(out).set_index("run")
    assert runs.loc[stages.FINETUNED, "status"] == "finished"


def test_the_stage_checkpoints_survive_pruning_and_rebuild_with_their_metrics(stage_runs):
    out, table = stage_runs
    for stage in (stages.SVD, stages.RANK_REDUCED, stages.FINETUNED):
        listed = wb.load_checkpoints(out / stage)
        staged = listed[listed["stage"] == stage]
        assert len(staged) == 1, stage  # one staged checkpoint per stage run, kept whatever retention says
        path = staged["path"].iloc[0]
        model, progress = wb.load_run_model(path)
        assert progress["run"]["compression"]["ranks"] == wb.compressed_ranks(model)
        again = wb.evaluate_checkpoint(path)
        # rebuilt from the recorded ranks and loaded: the same weights, evaluated again
        assert again["val_loss"] == pytest.approx(table.set_index("stage").loc[stage, "val_loss"], rel=1e-6)
    manager = wb.CheckpointManager(out / stages.SVD / "checkpoints", keep_last=1)
    model, _ = wb.load_run_model(wb.best_checkpoint(out / stages.SVD))
    manager.save(1, model)
    manager.save(2, model)
    manager.close()
    steps = set(wb.load_checkpoints(out / stages.SVD)["step"])
    assert steps == {0, 2}  # the staged step 0 stays, step 1 was pruned


def test_recovery_with_an_adapter_on_the_factors(tmp_path):
    table = wb.compress_task("digits", tmp_path / "c", rank=4, recover="lora", recover_rank=2, steps=50, lr=1e-2,
                             alpha=4, dropout=0.1, **FAST)  # the adapter's settings reach its run, not the stages
    runs = wb.load_runs(tmp_path / "c").set_index("run")
    assert runs.loc[stages.FINETUNED, "variant"] == "lora" and runs.loc[stages.FINETUNED, "alpha"] == 4
    assert wb.run_settings(tmp_path / "c" / stages.FINETUNED)["options"]["dropout"] == 0.1
    model, _ = wb.load_run_model(wb.best_checkpoint(tmp_path / "c" / stages.FINETUNED))
    adapted = [name for name, _ in wb.adapter_layers(model)]
    assert adapted and all(name.endswith((".up", ".down")) for name in adapted)
    rows = table.set_index("stage")
    assert rows.loc[stages.FINETUNED, "val_loss"] < rows.loc[stages.RANK_REDUCED, "val_loss"]


def test_compress_task_refuses_before_writing_anything(tmp_path):
    with pytest.raises(ValueError, match="give one of rank, energy or params"):
        wb.compress_task("digits", tmp_path / "a")
    with pytest.raises(ValueError, match="unknown variant 'nope'"):
        wb.compress_task("digits", tmp_path / "b", energy=0.5, recover="nope")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_the_runs_table_the_report_and_the_browser_show_the_stages_side_by_side(stage_runs, tmp_path):
    out, table = stage_runs
    runs = wb.load_runs(out).set_index("run")
    assert set(runs["compression"]) == {"energy=0.6"}
    assert dict(runs["compression_stage"]) == {s: s for s in (stages.SVD, stages.RANK_REDUCED, stages.FINETUNED)}
    assert len(wb.summarize(out)) == 3  # each stage a configuration of its own, never pooled as seeds
    figure = wb.plots.compression_stages(runs.reset_index(), "test_loss")
    (trace,) = figure.data
    assert list(trace.text) == [stages.SVD, stages.RANK_REDUCED, stages.FINETUNED]
    assert list(trace.x) == list(table["parameters"]) and list(trace.y) == list(table["test_loss"])
    page = wb.write_report(out, tmp_path / "report.html").read_text()
    assert "<h2>Compression</h2>" in page
    browser = wb.ui.CheckpointBrowser(out)
    pd_testing_frame_equal(browser.stages, wb.compression_stages(out))
    assert "compression stages" in browser.stages_table.value and "rank-reduced" in browser.stages_table.value


def pd_testing_frame_equal(left, right) -> None:
    import pandas as pd

    pd.testing.assert_frame_equal(left.reset_index(drop=True), right.reset_index(drop=True))


def test_the_cli_compresses_and_recovers_in_one_command(tmp_path, capsys):
    from workbench.cli import main

    out = tmp_path / "c"
    assert main(["compress", "--task", "digits", "--rank", "4", "--steps", "50", "--lr", "3e-3", "--eval-every", "25",
                 "--quiet", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert all(stage in printed for stage in (stages.SVD, stages.RANK_REDUCED, stages.FINETUNED))
    ranks = wb.run_settings(out / stages.FINETUNED)["compression"]["ranks"]
    assert set(ranks.values()) == {4}  # every layer of digits' MLP saves parameters at rank 4
    with pytest.raises(SystemExit):
        main(["compress", "--task", "digits", "--out", str(tmp_path / "d")])
    assert "one of the arguments --rank --energy --params is required" in capsys.readouterr().err
