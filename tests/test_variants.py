"""Each variant's math and training rule, checked against its formula written out by hand."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import mlp, snapshot
from torch import nn

import workbench as wb
from workbench.adapters import vera_projections


def _train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, **optimizer: object) -> list[float]:
    opt = wb.make_optimizer(model, **({"lr": 1e-2} | optimizer))
    losses = []
    for _ in range(steps):
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


# Which tensors each variant may change, as name suffixes of the adapted layers' state.
CHANGES = {
    "lora": {"lora_A", "lora_B"},
    "lora-fa": {"lora_B"},
    "vera": {"vera_lambda_b", "vera_lambda_d"},
    "delta-lora": {"lora_A", "lora_B", "base_layer.weight"},
    "lora-plus": {"lora_A", "lora_B"},
    "dora": {"lora_A", "lora_B", "lora_magnitude_vector"},
}


@pytest.mark.parametrize("variant", wb.VARIANTS)
def test_variant_trains_only_what_it_names(variant, regression):
    x, y = regression
    model = wb.add_adapters(mlp(), variant, 4, targets=["0", "2"])
    before = snapshot(model)
    losses = _train(model, x, y, 25, lr=0.05)
    assert losses[-1] < 0.8 * losses[0]
    after = snapshot(model)
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    expected = {f"{layer}.{suffix}" for layer in ("0", "2") for suffix in CHANGES[variant]}
    assert changed == expected


@pytest.mark.parametrize("variant", wb.VARIANTS)
def test_every_option_describes_itself(variant):
    """Help for the CLI and the panel, a kind from the default, choices where a str has a fixed set."""
    for name, option in wb.variant_options(variant).items():
        assert len(option.help) > 20 and "%" not in option.help, name
        assert option.kind in (bool, int, float, str) and option.valid(option.default), name
        assert (option.choices is not None) == (name == "init"), name
    assert wb.variant_options(variant) == dict(wb.get_variant(variant).options)


def test_an_option_is_refused_when_its_default_does_not_fit():
    from workbench.adapters import Option

    with pytest.raises(TypeError, match=r"default must be a bool, int, float or str, not \[1, 2\]"):
        Option([1, 2], lambda v: True, "a list", "a list")
    with pytest.raises(ValueError, match=r"the default 'svd' is not among the choices \('default', 'pissa'\)"):
        Option("svd", lambda v: True, "a name", "how to start", ("default", "pissa"))
    with pytest.raises(TypeError, match=r"choices are for str options, not for one whose default is 1"):
        Option(1, lambda v: True, "1 or 2", "a count", (1, 2))
    with pytest.raises(ValueError, match=r"the default -1.0 is invalid: expected a finite number > 0"):
        wb.adapters.variant.positive_option(-1.0, "a ratio")


@pytest.mark.parametrize("variant", wb.VARIANTS)
def test_outputs_unchanged_at_initialisation(variant):
    base = mlp()
    x = torch.randn(8, 12)
    expected = base(x)
    torch.testing.assert_close(wb.add_adapters(base, variant, 4)(x), expected, rtol=0, atol=0)


@pytest.mark.parametrize("rslora", [False, True])
def test_lora_layer_is_w_x_plus_scaled_b_a_x(rslora):
    model = wb.add_adapters(mlp(), "lora", 4, alpha=12, targets="2", rslora=rslora)
    layer = model[2]
    nn.init.normal_(layer.lora_B)
    h = torch.randn(5, 24)
    scale = 12 / math.sqrt(4) if rslora else 12 / 4
    w, b = layer.base_layer.weight, layer.base_layer.bias
    expected = h @ w.T + b + scale * (h @ layer.lora_A.T @ layer.lora_B.T)
    torch.testing.assert_close(layer(h), expected)
    bound = 1 / math.sqrt(24)  # Kaiming-uniform with a = sqrt(5) is U(-1/sqrt(in), 1/sqrt(in))
    assert layer.lora_A.abs().max() <= bound and layer.lora_A.abs().max() > 0.8 * bound
    assert layer.lora_A.shape == (4, 24) and layer.lora_B.shape == (16, 4)


@pytest.mark.parametrize("rslora", [False, True])
def test_dora_layer_is_the_magnitude_times_the_row_normalised_updated_weight(rslora):
    """h = m / ||W + s B A||_c * (W + s B A) x + b, written out in double, with the norm a constant in backward."""
    model = wb.add_adapters(mlp(), "dora", 4, alpha=12, targets="2", rslora=rslora)
    layer = model[2]
    w, b = layer.base_layer.weight.detach(), layer.base_layer.bias.detach()
    torch.testing.assert_close(layer.lora_magnitude_vector.detach(), w.norm(dim=1))  # m starts as ||W||_c
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=generator))
        layer.lora_magnitude_vector.mul_(1 + 0.5 * torch.rand(16, generator=generator))
    h = torch.randn(5, 24, generator=generator)
    weights = torch.randn(5, 16, generator=generator)
    (layer(h) * weights).sum().backward()

    scale = 12 / math.sqrt(4) if rslora else 12 / 4
    m, a, b_ = (p.detach().double().requires_grad_() for p in
                (layer.lora_magnitude_vector, layer.lora_A, layer.lora_B))
    updated = w.double() + scale * b_ @ a  # V = W + s B A, (16, 24)
    norm = updated.norm(dim=1).detach()  # ||V||_c, (16,), no gradient
    expected = h.double() @ ((m / norm)[:, None] * updated).T + b.double()
    torch.testing.assert_close(layer(h).double(), expected.detach(), rtol=1e-5, atol=1e-6)  # float32 against double
    (expected * weights.double()).sum().backward()
    for mine, theirs in ((layer.lora_magnitude_vector, m), (layer.lora_A, a), (layer.lora_B, b_)):
        torch.testing.assert_close(mine.grad.double(), theirs.grad, rtol=1e-4, atol=1e-6)
    assert set(layer.adapter_params()) == {"lora_A", "lora_B", "lora_magnitude_vector"}


def test_vera_layer_formula_and_shared_projections():
    model = wb.add_adapters(mlp(), "vera", 6, d_initial=0.3, projection_seed=7)
    layers = [model[0], model[2], model[4]]
    # One pair, sized by the largest layer: A (r, max_in = 24), B (max_out = 24, r), one storage.
    assert layers[0].vera_A.shape == (6, 24) and layers[0].vera_B.shape == (24, 6)
    assert len({layer.vera_A.data_ptr() for layer in layers}) == 1
    a, b = vera_projections(6, 24, 24, seed=7)
    torch.testing.assert_close(layers[1].vera_A, a, rtol=0, atol=0)
    torch.testing.assert_close(layers[1].vera_B, b, rtol=0, atol=0)
    assert "vera_A" not in "".join(model.state_dict())  # regenerated from the seed, never stored
    layer = layers[1]
    assert torch.all(layer.vera_lambda_d == 0.3) and torch.all(layer.vera_lambda_b == 0)
    nn.init.normal_(layer.vera_lambda_b)
    h = torch.randn(5, 24)
    w, bias = layer.base_layer.weight, layer.base_layer.bias
    update = ((h @ a[:, :24].T) * layer.vera_lambda_d) @ b[:16].T * layer.vera_lambda_b
    torch.testing.assert_close(layer(h), h @ w.T + bias + update)


def test_vera_counts_r_plus_out_per_layer_whatever_the_rank():
    model = wb.add_adapters(mlp(), "vera", 64)  # r may exceed the layers' dimensions
    assert wb.trainable_parameters(model) == (64 + 24) + (64 + 16) + (64 + 6)


def test_lora_fa_gradients_are_the_formulas_in_double():
    """dL/dB = s G^T (X A^T) and dL/dx = W^T-part + s G B A for L = sum(G * layer(x)); A gets no gradient."""
    layer = wb.add_adapters(nn.Sequential(nn.Linear(6, 5)), "lora-fa", 3, alpha=6)[0].double()
    nn.init.normal_(layer.lora_B)
    x = torch.randn(4, 2, 6, dtype=torch.float64, requires_grad=True)
    g = torch.randn(4, 2, 5, dtype=torch.float64)
    (layer(x) * g).sum().backward()
    a, b, w, s = layer.lora_A.detach(), layer.lora_B.detach(), layer.base_layer.weight.detach(), layer.scaling
    assert s == 2.0 and layer.lora_A.grad is None
    torch.testing.assert_close(layer.lora_B.grad, s * g.reshape(-1, 5).T @ (x.detach().reshape(-1, 6) @ a.T))
    torch.testing.assert_close(x.grad, g @ w + s * (g @ b) @ a)


def test_lora_fa_keeps_only_the_rank_r_projection():
    """Autograd saves A x (N, r) for B's gradient, never the input x (N, in)."""
    n, width, rank = 256, 512, 4
    saved = {}
    for variant in ("lora", "lora-fa"):
        torch.manual_seed(0)
        model = wb.add_adapters(nn.Sequential(nn.Linear(width, width)), variant, rank)
        x = torch.randn(n, width, requires_grad=True)
        with wb.saved_activations(model) as saved[variant]:
            model(x).sum()
    float_bytes = 4
    assert saved["lora-fa"].bytes == n * rank * float_bytes  # only z = A x
    assert saved["lora"].bytes >= n * width * float_bytes  # x itself, for A's gradient
    assert saved["lora-fa"].bytes * (width // rank) <= saved["lora"].bytes


def test_lora_plus_steps_b_with_ratio_times_the_learning_rate(regression):
    x, y = regression
    model = wb.add_adapters(mlp(), "lora-plus", 4, targets="2", lr_ratio=8.0)
    layer = model[2]
    nn.init.normal_(layer.lora_B)
    opt = wb.make_optimizer(model, lr=0.05, optimizer="sgd")
    assert [group["lr"] for group in opt.param_groups] == [0.05, 0.05 * 8.0]
    nn.functional.mse_loss(model(x), y).backward()
    a, b = layer.lora_A.detach().clone(), layer.lora_B.detach().clone()
    grad_a, grad_b = layer.lora_A.grad.clone(), layer.lora_B.grad.clone()
    opt.step()
    torch.testing.assert_close(layer.lora_A.detach(), a - 0.05 * grad_a)
    torch.testing.assert_close(layer.lora_B.detach(), b - 0.4 * grad_b)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_delta_lora_moves_w_by_the_change_of_the_product_from_delta_start(regression, optimizer):
    x, y = regression
    lam, start = 0.7, 3
    model = wb.add_adapters(mlp(), "delta-lora", 4, alpha=8, targets=["0", "2"], delta_lambda=lam, delta_start=start)
    layers = [model[0], model[2]]
    opt = wb.make_optimizer(model, lr=0.02, optimizer=optimizer)
    for step in range(1, 7):
        before = [(layer.base_layer.weight.detach().clone(), (layer.lora_B @ layer.lora_A).detach()) for layer in layers]
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        for layer, (w_old, product_old) in zip(layers, before, strict=True):
            product_new = (layer.lora_B @ layer.lora_A).detach()
            if step <= start:
                assert torch.equal(layer.base_layer.weight, w_old)
            else:
                expected = w_old + lam * (8 / 4) * (product_new - product_old)
                torch.testing.assert_close(layer.base_layer.weight.detach(), expected)
                assert not torch.equal(layer.base_layer.weight, w_old)
        assert layers[0].base_layer.weight.grad is None
    assert opt.param_groups[0]["delta_steps"] == 6


def test_delta_lora_step_count_travels_with_the_optimizer_state(regression):
    """A new optimizer loaded from a saved state continues the count, so delta_start holds on resume."""
    x, y = regression
    model = wb.add_adapters(mlp(), "delta-lora", 4, delta_start=4)
    opt = wb.make_optimizer(model, lr=0.02)
    for _ in range(2):
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    resumed = wb.make_optimizer(model, lr=0.02)
    resumed.load_state_dict(opt.state_dict())
    assert resumed.param_groups[0]["delta_steps"] == 2


def test_dropout_acts_on_the_adapter_path_only_in_training():
    model = wb.add_adapters(mlp(), "lora", 4, dropout=0.5)
    for module in model:
        if isinstance(module, wb.AdapterLayer):
            nn.init.normal_(module.lora_B)
    x = torch.randn(16, 12)
    model.train()
    assert not torch.equal(model(x), model(x))
    model.eval()
    torch.testing.assert_close(model(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize("variant", ["lora", "vera"])
def test_adapters_take_the_mode_of_the_layers_they_replace(variant):
    """A model adapted in eval mode infers without dropout; adapted in training mode, it trains with it."""
    model = mlp().eval()
    wb.add_adapters(model, variant, 4, dropout=0.5)
    layers = [layer for _, layer in wb.adapter_layers(model)]
    assert all(not module.training for layer in layers for module in layer.modules())
    for layer in layers:  # a non-zero update, so that dropout on its path would show
        nn.init.normal_(layer.adapter_params()["vera_lambda_b" if variant == "vera" else "lora_B"])
    x = torch.randn(16, 12)
    torch.testing.assert_close(model(x), model(x), rtol=0, atol=0)
    expected = x
    for module in model:  # dropout off: every adapted layer is W x + b + delta W x
        if isinstance(module, wb.AdapterLayer):
            expected = module.base_layer(expected) + expected @ module.delta_weight().T
        else:
            expected = module(expected)
    # B (A x) against (B A) x: float32 rounding only; dropout at p = 0.5 would change outputs by O(1)
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)

    training = mlp()
    training[4].eval()  # a layer the user froze in eval mode keeps it
    wb.add_adapters(training, variant, 4, dropout=0.5)
    assert [training[i].training for i in (0, 2, 4)] == [True, True, False]
