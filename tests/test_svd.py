"""PiSSA initialisation, spectra, effective ranks and rank reduction, checked against torch.linalg and peft."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import mlp, snapshot
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open
from torch import nn
from transformers import BertConfig, BertModel, GPT2Config, GPT2Model

import workbench as wb

LORA_FAMILY = tuple(v for v in wb.VARIANTS if "init" in wb.variant_options(v))  # those that take init="pissa"
X = torch.randn(32, 12, generator=torch.Generator().manual_seed(3))


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def train(model: nn.Module, steps: int = 5, lr: float = 1e-2) -> nn.Module:
    """A few optimizer steps towards a fixed random target, so B A has moved."""
    optimizer = wb.make_optimizer(model, lr)
    target = torch.randn(32, 6, generator=torch.Generator().manual_seed(4))
    for _ in range(steps):
        optimizer.zero_grad()
        F.mse_loss(model(X), target).backward()
        optimizer.step()
    return model


def randomised(variant: str = "lora", rank: int = 4, **options) -> nn.Module:
    """``mlp()`` with adapters whose B is random, so every update has rank ``rank`` exactly."""
    model = wb.add_adapters(mlp(), variant, rank, alpha=2 * rank, **options)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for _, layer in wb.adapter_layers(model):
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=generator))
    return model


def truncated(delta: torch.Tensor, rank: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vh[:rank]


# -- PiSSA initialisation -----------------------------------------------------------------------


@pytest.mark.parametrize("rslora", [False, True])
@pytest.mark.parametrize("variant", LORA_FAMILY)
def test_pissa_keeps_outputs_and_moves_the_top_singular_part_of_w_into_the_adapter(variant, rslora):
    base = mlp()
    original = {name: layer.weight.detach().clone() for name, layer in base.named_children()
                if isinstance(layer, nn.Linear)}
    expected = base(X)
    model = wb.add_adapters(copy.deepcopy(base), variant, 3, alpha=6, init="pissa", rslora=rslora)
    torch.testing.assert_close(model(X), expected, atol=1e-5, rtol=0)
    assert wb.adapter_config(model).options["init"] == "pissa"
    for name, layer in wb.adapter_layers(model):
        principal = truncated(original[name], 3).float()
        torch.testing.assert_close(layer.delta_weight(), principal, atol=1e-5, rtol=0)
        torch.testing.assert_close(layer.base_weight(), original[name] - principal, atol=1e-5, rtol=0)
        # symmetric split: A A^T = B^T B = S_r / s
        torch.testing.assert_close(layer.lora_A @ layer.lora_A.T, layer.lora_B.T @ layer.lora_B, atol=1e-5, rtol=0)
    assert not any(key.endswith(("lora_A0", "lora_B0")) for key in model.state_dict())


@pytest.mark.parametrize("rslora", [False, True])
def test_pissa_factors_and_residual_are_those_of_peft(rslora):
    ours = wb.add_adapters(mlp(), "lora", 3, alpha=5, init="pissa", rslora=rslora)
    config = LoraConfig(r=3, lora_alpha=5, target_modules=["0", "2", "4"], init_lora_weights="pissa", use_rslora=rslora)
    theirs = get_peft_model(mlp(), config).base_model.model
    for name, layer in wb.adapter_layers(ours):
        peft_layer = theirs.get_submodule(name)
        torch.testing.assert_close(layer.lora_A, peft_layer.lora_A["default"].weight)
        torch.testing.assert_close(layer.lora_B, peft_layer.lora_B["default"].weight)
        torch.testing.assert_close(layer.base_weight(), peft_layer.base_layer.weight)


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_pissa_keeps_the_outputs_of_transformers_models(family):
    torch.manual_seed(0)
    if family == "bert":
        base = BertModel(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                    intermediate_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
        targets = ["query", "value", "dense"]
    else:  # Conv1D: weights stored (in, out)
        base = GPT2Model(GPT2Config(vocab_size=50, n_embd=32, n_layer=2, n_head=4, n_positions=16,
                                    resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
        targets = ["c_attn", "c_fc"]
    base.eval()
    ids = torch.randint(0, 50, (2, 10), generator=torch.Generator().manual_seed(0))
    expected = base(ids).last_hidden_state
    model = wb.add_adapters(base, "lora", 4, alpha=8, targets=targets, init="pissa")
    assert len(list(wb.adapter_layers(model))) >= 4
    torch.testing.assert_close(model(ids).last_hidden_state, expected, atol=1e-4, rtol=0)


def test_vera_refuses_pissa_and_a_bad_init_is_named():
    model = mlp()
    with pytest.raises(ValueError, match="unknown option 'init' for variant 'vera'; valid options: d_initial"):
        wb.add_adapters(model, "vera", 4, init="pissa")
    with pytest.raises(ValueError, match="init='svd'.*expected 'default' or 'pissa'"):
        wb.add_adapters(model, "lora", 4, init="svd")
    assert not list(wb.adapter_layers(model))


def test_removal_gives_back_the_original_weight_and_merging_keeps_the_trained_outputs():
    base = mlp()
    model = train(wb.add_adapters(copy.deepcopy(base), "lora", 4, init="pissa"))
    trained = model(X).detach()
    wb.merge_adapters(model)
    torch.testing.assert_close(model(X), trained, atol=1e-5, rtol=0)
    wb.unmerge_adapters(model)
    torch.testing.assert_close(model(X), trained, atol=1e-5, rtol=0)

    kept = wb.remove_adapters(copy.deepcopy(model), merge=True)
    torch.testing.assert_close(kept(X), trained, atol=1e-5, rtol=0)
    restored = wb.remove_adapters(model)
    for key, value in base.state_dict().items():
        torch.testing.assert_close(restored.state_dict()[key], value, atol=1e-6, rtol=0)


def test_pissa_lora_fa_trains_b_only_from_the_svd_factor_of_w():
    model = wb.add_adapters(mlp(), "lora-fa", 4, init="pissa")
    layer = model[0]
    a, b = layer.lora_A.detach().clone(), layer.lora_B.detach().clone()
    torch.testing.assert_close(a, layer.lora_A0)
    train(model)
    assert torch.equal(layer.lora_A, a) and not torch.allclose(layer.lora_B, b)
    assert wb.trainable_parameters(model) == sum(m.out_features * 4 for _, m in wb.adapter_layers(model))


@pytest.mark.parametrize("variant", ["lora", "delta-lora"])
def test_a_pissa_checkpoint_of_the_adapter_tensors_loads_into_a_fresh_pissa_model(tmp_path, variant):
    model = train(wb.add_adapters(mlp(), variant, 4, init="pissa"))
    with wb.CheckpointManager(tmp_path) as manager:
        path = manager.save(5, model)
        fresh = wb.add_adapters(mlp(), variant, 4, init="pissa")
        assert not torch.allclose(fresh(X), model(X))
        manager.load(path, fresh)
    torch.testing.assert_close(fresh(X), model(X), atol=1e-6, rtol=0)
    with safe_open(path / "model.safetensors", framework="pt") as file:
        keys = set(file.keys())
    moved = {f"{name}.base_layer.weight" for name in ("0", "2", "4")} if variant == "delta-lora" else set()
    assert keys == {f"{name}.lora_{m}" for name in ("0", "2", "4") for m in "AB"} | moved


@pytest.mark.parametrize(("variant", "rslora"), [("lora", False), ("lora-fa", True), ("lora-plus", False)])
def test_a_trained_pissa_adapter_exported_to_peft_gives_the_same_outputs(tmp_path, variant, rslora):
    model = train(wb.add_adapters(mlp(), variant, 3, alpha=6, init="pissa", rslora=rslora))
    wb.export_peft(model, tmp_path)
    peft_model = PeftModel.from_pretrained(mlp(), tmp_path)
    torch.testing.assert_close(peft_model(X), model(X), atol=1e-5, rtol=0)
    imported = wb.import_peft(mlp(), tmp_path)  # uniform rank 2r: our own reader takes it too
    torch.testing.assert_close(imported(X), model(X), atol=1e-5, rtol=0)


# -- spectra ---------------------------------------------------------------------------------------


def test_spectrum_is_the_singular_values_of_each_update_and_effective_rank_reads_it():
    model = train(wb.add_adapters(mlp(), "lora", 4), steps=10)
    table = wb.spectrum(model)
    assert list(table.columns) == ["layer", "index", "value", "energy"]
    ranks = wb.effective_rank(table, energy=0.8)
    assert list(ranks.index) == ["0", "2", "4"]
    for name, layer in wb.adapter_layers(model):
        rows = table[table["layer"] == name]
        values = torch.linalg.svdvals(layer.delta_weight().detach().double())[:4]
        assert rows["index"].tolist() == [1, 2, 3, 4]
        np.testing.assert_allclose(rows["value"], values.numpy(), rtol=1e-4, atol=1e-7)
        cumulative = (values**2).cumsum(0) / (values**2).sum()
        np.testing.assert_allclose(rows["energy"], cumulative.numpy(), rtol=1e-4)
        assert ranks[name] == int((cumulative < 0.8).sum()) + 1
    assert wb.effective_rank(model, energy=0.8).equals(ranks)


def test_an_untrained_update_has_effective_rank_zero():
    model = wb.add_adapters(mlp(), "lora", 4)
    table = wb.spectrum(model)
    assert (table["value"] == 0).all() and table["energy"].isna().all()
    assert (wb.effective_rank(table) == 0).all()
    with pytest.raises(ValueError, match="energy must be a number in"):
        wb.effective_rank(table, energy=0)


# -- rank reduction --------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["lora", "lora-plus", "delta-lora"])
def test_reduce_rank_is_the_truncated_svd_with_the_tail_as_error(variant):
    model = randomised(variant)
    deltas = {name: layer.delta_weight().detach().clone() for name, layer in wb.adapter_layers(model)}
    table = wb.reduce_rank(model, rank=2)
    assert table["new_rank"].tolist() == [2, 2, 2] and table["old_rank"].tolist() == [4, 4, 4]
    for row in table.itertuples():
        layer, delta = model.get_submodule(row.layer), deltas[row.layer]
        s = torch.linalg.svdvals(delta.double())[:4]
        assert row.relative_error == pytest.approx(math.sqrt((s[2:] ** 2).sum() / (s**2).sum()), rel=1e-4)
        assert row.kept_energy == pytest.approx(float((s[:2] ** 2).sum() / (s**2).sum()), rel=1e-5)
        assert layer.lora_A.shape == (2, layer.in_features) and layer.lora_B.shape == (layer.out_features, 2)
        x = torch.randn(7, layer.in_features, generator=torch.Generator().manual_seed(6))
        expected = F.linear(x.double(), (layer.base_weight().detach().double() + truncated(delta, 2)),
                            layer.bias.detach().double())
        torch.testing.assert_close(layer(x).double(), expected, atol=1e-5, rtol=0)
    config = wb.adapter_config(model)
    assert (config.rank, config.alpha, config.layer_ranks) == (2, 4, {})  # alpha / rank = 8 / 4 as before
    train(model, steps=1)  # a new optimizer trains the new factors


def test_energy_picks_the_smallest_sufficient_rank_per_layer():
    model = randomised(rank=6)
    spectra = {name: torch.linalg.svdvals(layer.delta_weight().detach().double())[:6]
               for name, layer in wb.adapter_layers(model)}
    table = wb.reduce_rank(model, energy=0.75)
    for row in table.itertuples():
        cumulative = (spectra[row.layer] ** 2).cumsum(0) / (spectra[row.layer] ** 2).sum()
        assert cumulative[row.new_rank - 1] >= 0.75
        assert row.new_rank == 1 or cumulative[row.new_rank - 2] < 0.75
        assert row.kept_energy == pytest.approx(float(cumulative[row.new_rank - 1]), rel=1e-5)
    ranks = dict(zip(table["layer"], table["new_rank"], strict=True))
    assert {layer.rank for _, layer in wb.adapter_layers(model)} == set(ranks.values())
    config = wb.adapter_config(model)
    assert config.rank == max(ranks.values()) and config.ranks() == ranks
    assert config.alpha / config.rank == pytest.approx(2.0)  # s = 12 / 6 kept


def test_lora_fa_keeps_a_frozen_after_reduction():
    model = randomised("lora-fa")
    wb.reduce_rank(model, rank={"0": 1, "2": 3})
    assert [layer.rank for _, layer in wb.adapter_layers(model)] == [1, 3, 4]
    assert wb.adapter_config(model).layer_ranks == {"0": 1, "2": 3, "4": 4}
    for _, layer in wb.adapter_layers(model):
        assert not layer.lora_A.requires_grad and layer.lora_B.requires_grad
    a = model[0].lora_A.detach().clone()
    train(model, steps=2)
    assert torch.equal(model[0].lora_A, a)
    assert wb.trainable_parameters(model) == 24 * 1 + 16 * 3 + 6 * 4


def test_vera_cannot_be_reduced_and_the_model_stays_as_it_was():
    model = wb.add_adapters(mlp(), "vera", 4)
    before = snapshot(model)
    assert LORA_FAMILY == ("lora", "lora-fa", "delta-lora", "lora-plus")
    with pytest.raises(ValueError, match=f"variant 'vera' cannot be rank-reduced: .*; variants that can: "
                                         f"{', '.join(LORA_FAMILY)}$"):
        wb.reduce_rank(model, rank=2)
    assert all(torch.equal(t, before[k]) for k, t in snapshot(model).items())


@pytest.mark.parametrize(("arguments", "message"), [
    ({}, "exactly one of rank= .* or energy="),
    ({"rank": 2, "energy": 0.9}, "exactly one of"),
    ({"rank": 5}, "rank 5 for layer '0' is invalid: expected an integer from 1 to its current rank 4"),
    ({"rank": 0}, "rank 0 for layer '0' is invalid"),
    ({"rank": 2.0}, "rank must be an integer >= 1 or a dict of layer name -> rank, not 2.0"),
    ({"rank": {"2": 2.5}}, "rank 2.5 for layer '2' is invalid"),
    ({"rank": {"2": 1, "fc9": 1}}, "'fc9' is not an adapted layer; valid layers: 0, 2, 4"),
    ({"rank": "2"}, "rank must be an integer >= 1 or a dict"),
    ({"energy": 0}, r"energy must be a number in \(0, 1\]"),
    ({"energy": 1.5}, "energy must be a number in"),
])
def test_bad_input_is_refused_and_leaves_the_model_unchanged(arguments, message):
    model = randomised()
    before, config = snapshot(model), wb.adapter_config(model)
    with pytest.raises(ValueError, match=message):
        wb.reduce_rank(model, **arguments)
    after = snapshot(model)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert wb.adapter_config(model) is config


def test_a_model_without_adapters_or_merged_is_refused():
    with pytest.raises(ValueError, match="the model has no adapters"):
        wb.reduce_rank(mlp(), rank=1)
    model = wb.merge_adapters(randomised())
    with pytest.raises(ValueError, match="merged; call wb.unmerge_adapters"):
        wb.reduce_rank(model, rank=1)


def test_a_reduced_pissa_model_exports_to_peft_with_per_layer_ranks(tmp_path):
    model = train(wb.add_adapters(mlp(), "lora", 4, alpha=8, init="pissa"))
    wb.reduce_rank(model, rank={"0": 1, "4": 2})
    wb.export_peft(model, tmp_path)
    peft_model = PeftModel.from_pretrained(mlp(), tmp_path)
    torch.testing.assert_close(peft_model(X), model(X), atol=1e-5, rtol=0)
    assert [m.r["default"] for m in (peft_model.base_model.model[i] for i in (0, 2, 4))] == [5, 8, 6]


def test_a_reduced_model_survives_a_checkpoint_round_trip(tmp_path):
    model = train(randomised("lora-plus"))
    wb.reduce_rank(model, energy=0.7)
    with wb.CheckpointManager(tmp_path) as manager:
        path = manager.save(1, model, stage="rank-reduced")
        fresh = wb.add_adapters(mlp(), "lora-plus", 4, alpha=8)
        with pytest.raises(wb.CheckpointError, match="does not fit this model"):
            manager.load(path, fresh)  # still rank 4 everywhere
        wb.match_ranks(fresh, path)
        manager.load(path, fresh)
    assert wb.adapter_config(fresh) == wb.adapter_config(model)
    torch.testing.assert_close(fresh(X), model(X), atol=1e-6, rtol=0)


def test_a_reduced_checkpoint_of_a_run_loads_and_the_ranks_show_over_checkpoints(tmp_path):
    run = wb.Run("digits", "lora", 4, tmp_path / "run", steps=6, eval_every=3, save_every=3, progress_bar=False)
    run.fit()
    table = wb.reduce_rank(run.model, energy=0.6)
    with wb.CheckpointManager(tmp_path / "run" / "checkpoints") as manager:
        path = manager.save(7, run.model, stage="rank-reduced")
    model, progress = wb.load_run_model(path)
    assert progress["stage"] == "rank-reduced"
    assert [layer.rank for _, layer in wb.adapter_layers(model)] == table["new_rank"].tolist()
    x = torch.randn(5, *next(iter(wb.tasks.get_task("digits").datasets(0)["val"]))[0].shape)
    torch.testing.assert_close(model(x), run.model(x), atol=1e-6, rtol=0)

    ranks = wb.spectrum_over_checkpoints(tmp_path / "run", energy=0.6)
    assert ranks["step"].unique().tolist() == [3, 6, 7]
    last = ranks[ranks["step"] == 7].set_index("layer")["effective_rank"]
    assert last.tolist() == table["new_rank"].tolist()  # a truncation to r' keeps that energy within r'
    figure = wb.plots.effective_rank_over_checkpoints(ranks)
    assert len(figure.data) == 3 and list(figure.data[0].x) == [3, 6, 7]


def test_spectrum_figure_draws_values_and_energy_per_layer():
    table = wb.spectrum(randomised())
    figure = wb.plots.spectrum(table)
    assert len(figure.data) == 6
    np.testing.assert_allclose(figure.data[0].y, table[table["layer"] == "0"]["value"])
    np.testing.assert_allclose(figure.data[1].y, table[table["layer"] == "0"]["energy"])
    with pytest.raises(ValueError, match="lacks the column"):
        wb.plots.spectrum(table.drop(columns="energy"))


# -- the SVD factors' layout -------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_svd_factors_are_the_scaled_truncated_svd_contiguous_in_the_asked_dtype(dtype):
    matrix = torch.randn(9, 7, generator=torch.Generator().manual_seed(8))
    a, b = wb.adapters.svd_factors(matrix, 3, 0.5, dtype)
    assert a.shape == (3, 7) and b.shape == (9, 3) and a.dtype == b.dtype == dtype
    assert a.is_contiguous() and b.is_contiguous()
    singular = torch.linalg.svdvals(matrix.double())[:3]
    # float32 SVD against float64 (plus bfloat16's 8-bit mantissa where asked)
    tolerance = 1e-5 if dtype != torch.bfloat16 else 5e-2
    product = 0.5 * (b.double() @ a.double())
    torch.testing.assert_close(product, truncated(matrix, 3), atol=tolerance * singular[0].item(), rtol=0)
    gram = torch.diag(singular / 0.5)  # A A^T = S_r / s: the scale split evenly
    torch.testing.assert_close(a.double() @ a.double().T, gram, atol=tolerance * gram[0, 0].item(), rtol=0)
    torch.testing.assert_close(b.double().T @ b.double(), gram, atol=tolerance * gram[0, 0].item(), rtol=0)


def _adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {f"{name}.{key}": tensor for name, layer in wb.adapter_layers(model)
            for key, tensor in [*layer.named_parameters(recurse=False), *layer.named_buffers(recurse=False)]}


def _pissa() -> nn.Module:
    return wb.add_adapters(mlp(), "lora", 3, alpha=6, init="pissa")


def _reduced() -> nn.Module:
    model = train(randomised("lora"))  # rank 4, alpha 8
    wb.reduce_rank(model, rank=2)  # alpha 4: s = 2 kept
    return model


def _pissa_reduced() -> nn.Module:
    model = train(wb.add_adapters(mlp(), "lora-fa", 4, alpha=8, init="pissa"))
    wb.reduce_rank(model, rank=2)
    return model


SVD_BUILT = {  # a model whose factors come from an SVD, and (variant, rank, alpha) of a plain model its shape
    "pissa": (_pissa, ("lora", 3, 6)),
    "reduced": (_reduced, ("lora", 2, 4)),
    "pissa-then-reduced": (_pissa_reduced, ("lora-fa", 2, 4)),
}


@pytest.mark.parametrize("case", SVD_BUILT)
def test_svd_built_factors_are_contiguous_and_compute_as_a_loaded_checkpoint(case, fixed_threads):
    """A model in memory gives bitwise the outputs of its state dict loaded as contiguous tensors, as from a file."""
    build, (variant, rank, alpha) = SVD_BUILT[case]
    model = build()
    tensors = _adapter_tensors(model)
    assert tensors and all(tensor.is_contiguous() for tensor in tensors.values()), [
        name for name, tensor in tensors.items() if not tensor.is_contiguous()
    ]
    fresh = wb.add_adapters(mlp(), variant, rank, alpha=alpha)  # default init: factors made contiguous
    state = {key: value.detach().clone(memory_format=torch.contiguous_format) for key, value in model.state_dict().items()}
    fresh.load_state_dict(state)
    # the same values through the same kernels: equal to the last bit (column-major factors differed by ~1e-6 on AMD)
    assert torch.equal(fresh(X), model(X))
