"""Compression by truncated SVD: a pretrained model's own weight matrices as products of thin factors.

A linear layer h = W x + b with W (out, in) of singular values s_1 >= s_2 >= ... becomes two
layers, in -> k -> out::

    W = U S V^T ~ W_k = (U_k S_k^1/2)(S_k^1/2 V_k^T) = up.weight @ down.weight

``down`` (k, in) without bias, ``up`` (out, k) with the layer's bias: k (in + out) parameters
instead of in x out, fewer when k < in out / (in + out). By Eckart-Young W_k is the best rank-k
approximation in Frobenius norm, with relative error ||W - W_k||_F / ||W||_F =
sqrt(sum_{i>k} s_i^2 / sum_i s_i^2), the square root of the energy it drops.

``compress`` chooses k per layer by a fixed rank, by the energy kept, or by one parameter budget
for the whole model, and returns the per-layer table; ``factorize`` rebuilds a compressed model
from the ranks it recorded (``compressed_ranks``), as the runs layer does for a compressed run.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import nn

from .adapt import refuse_adapted
from .adapters import linear_weight
from .checks import is_integer
from .svd import check_energy, cumulative_energy, smallest_rank
from .targets import Targets, find_targets

COMPRESSION_COLUMNS = ("layer", "shape", "rank", "factored", "energy", "params_before", "params_after", "error")


class LowRankLinear(nn.Module):
    """h = up(down(x)) = U_k S_k V_k^T x + b: a linear layer (out, in) factorised at rank k.

    Args:
        down: (k, in), S_k^1/2 V_k^T, no bias.
        up: (out, k), U_k S_k^1/2; ``bias`` (out,) or None.

    Attributes:
        down, up: the two ``nn.Linear`` layers, so adapters (``targets=["query.up"]``) and
            ``train=`` patterns reach them as any linear layer.
    """

    def __init__(self, down: torch.Tensor, up: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        rank, in_features = down.shape
        out_features = up.shape[0]
        self.down = nn.Linear(in_features, rank, bias=False, device=down.device, dtype=down.dtype)
        self.up = nn.Linear(rank, out_features, bias=bias is not None, device=up.device, dtype=up.dtype)
        with torch.no_grad():
            self.down.weight.copy_(down)
            self.up.weight.copy_(up)
            if bias is not None:
                self.up.bias.copy_(bias)

    @property
    def rank(self) -> int:
        return self.down.out_features

    @property
    def in_features(self) -> int:
        return self.down.in_features

    @property
    def out_features(self) -> int:
        return self.up.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in) -> (..., k) -> (..., out)."""
        return self.up(self.down(x))

    def weight_product(self) -> torch.Tensor:
        """up.weight @ down.weight, (out, in): the dense matrix the layer applies."""
        return self.up.weight @ self.down.weight

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


@dataclass
class _Plan:
    """One layer's SVD and the rank chosen for it (None: left dense)."""

    name: str
    module: nn.Module
    u: torch.Tensor  # (out, m), float32
    s: torch.Tensor  # (m,), descending
    vh: torch.Tensor  # (m, in)
    rank: int | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return self.u.shape[0], self.vh.shape[1]

    @property
    def dense_params(self) -> int:
        out, in_ = self.shape
        return out * in_

    @property
    def rank_cost(self) -> int:
        """The parameters one more rank adds: in + out."""
        return sum(self.shape)

    def factored_params(self, rank: int) -> int:
        out, in_ = self.shape
        return rank * (out + in_)

    def saves(self, rank: int) -> bool:
        """Whether rank k has fewer parameters than the dense matrix: k (in + out) < in out."""
        return self.factored_params(rank) < self.dense_params

    def energy(self, rank: int) -> float:
        """sum_{i<=k} s_i^2 / sum_i s_i^2 (1 for a zero matrix: nothing is lost)."""
        cumulative = cumulative_energy(self.s)
        return 1.0 if np.isnan(cumulative[rank - 1]) else float(cumulative[rank - 1])


def _weight(module: nn.Module) -> torch.Tensor:
    """W (out, in) of a supported layer or of a compressed one."""
    return module.weight_product() if isinstance(module, LowRankLinear) else linear_weight(module)


def _layers(model: nn.Module, targets: Targets) -> dict[str, nn.Module]:
    """The layers to compress: in a compressed model its compressed layers (all, or those ``targets`` names
    exactly), which are truncated further; else the linear layers ``targets`` selects (``find_targets``)."""
    compressed = {name: m for name, m in model.named_modules() if isinstance(m, LowRankLinear)}
    if not compressed:
        return find_targets(model, targets)
    if targets is None:
        return compressed
    names = [targets] if isinstance(targets, str) else list(targets)
    unknown = [name for name in names if name not in compressed]
    if unknown:
        raise ValueError(f"{unknown[0]!r} is not a compressed layer of this compressed model; its compressed layers: "
                         f"{', '.join(compressed)}")
    return {name: compressed[name] for name in names}


def _choose_by_budget(plans: list[_Plan], budget: int, fixed: int) -> None:
    """Ranks for a whole-model parameter budget, the largest singular values first.

    Every layer starts at rank 1; the singular values of all layers are then taken in descending
    order, each adding (in + out) parameters to its layer, while the model stays within the
    budget. A layer whose rank reaches the point where the factors stop saving parameters is made
    dense (in x out, all its values kept) if that fits. ``fixed`` counts the parameters of every
    other layer of the model.
    """
    minimum = fixed + sum(plan.factored_params(1) for plan in plans)
    if budget < minimum:
        raise ValueError(f"a budget of {budget:,} parameters is too small: the model's other parameters and rank 1 "
                         f"in every compressed layer take {minimum:,}")
    for plan in plans:
        plan.rank = 1
    used = minimum
    order = sorted(((float(value), index, plan) for plan in plans for index, value in enumerate(plan.s.tolist())
                    if index > 0), key=lambda item: -item[0])
    for _, index, plan in order:
        if plan.rank is None or index != plan.rank:  # made dense, or an earlier value of it did not fit
            continue
        grows = plan.saves(plan.rank + 1)
        cost = plan.rank_cost if grows else plan.dense_params - plan.factored_params(plan.rank)
        if used + cost <= budget:
            used += cost
            plan.rank = plan.rank + 1 if grows else None  # None: dense, all its values kept


def compress(
    model: nn.Module,
    rank: int | None = None,
    energy: float | None = None,
    params: int | None = None,
    targets: Targets = None,
    ranks: Mapping[str, int | None] | None = None,
) -> pd.DataFrame:
    """Replace the target linear layers of ``model`` by their truncated SVDs (``LowRankLinear``), in place.

    Give at most one of ``rank``, ``energy``, ``params`` and ``ranks``; with none, every target is
    factorised at full rank min(in, out) (the "svd" stage: the outputs equal the original's within
    float32 rounding, and nothing is saved yet).

    Args:
        rank: k for every layer (at most min(in, out)).
        energy: per layer, the smallest k with sum_{i<=k} s_i^2 >= energy * sum_i s_i^2, in (0, 1].
        params: the largest total parameter count of the compressed model; ranks are allocated
            across layers by the largest singular values first (``_choose_by_budget``).
        targets: as ``wb.add_adapters``' (None: every ``nn.Linear`` and ``Conv1D``, tied layers
            skipped; a tied one named is refused). A model already compressed is truncated
            further: its compressed layers are the targets.
        ranks: layer name -> k, or None to leave it dense: what ``compressed_ranks`` recorded.

    With ``rank``, ``energy`` or ``params``, a layer whose k would not save parameters
    (k (in + out) >= in out) stays dense.

    Returns:
        One row per target layer: layer, shape ("out x in"), rank (k; None when dense), factored,
        energy (the fraction of sum s_i^2 kept), params_before, params_after, error (relative
        Frobenius error ||W - W_k||_F / ||W||_F, the square root of the energy dropped).

    Raises:
        ValueError: more than one mode, a bad rank, energy or budget, a model with adapters, or
            ranks naming a layer that is not a target; the model is then unchanged.
    """
    given = [name for name, value in (("rank", rank), ("energy", energy), ("params", params), ("ranks", ranks))
             if value is not None]
    if len(given) > 1:
        raise ValueError(f"give one of rank, energy, params or ranks, not {' and '.join(given)}")
    refuse_adapted(model)
    if rank is not None and (not is_integer(rank) or rank < 1):
        raise ValueError(f"rank must be an integer >= 1, not {rank!r}")
    if energy is not None:
        energy = check_energy(energy)
    if params is not None and (not is_integer(params) or params < 1):
        raise ValueError(f"params must be an integer >= 1 (the compressed model's parameter count), not {params!r}")
    layers = _layers(model, targets if ranks is None else list(ranks))
    plans = []
    with torch.no_grad():
        for name, module in layers.items():
            u, s, vh = torch.linalg.svd(_weight(module).detach().float(), full_matrices=False)
            plans.append(_Plan(name, module, u, s, vh))
    for plan in plans:
        full = len(plan.s)
        if ranks is not None:
            plan.rank = ranks[plan.name]
            if plan.rank is not None and not (is_integer(plan.rank) and 1 <= plan.rank <= full):
                raise ValueError(f"the rank of {plan.name!r} must be an integer in [1, {full}], not {plan.rank!r}")
        elif rank is not None:
            plan.rank = min(rank, full) if plan.saves(min(rank, full)) else None
        elif energy is not None:
            chosen = max(1, smallest_rank(cumulative_energy(plan.s), energy))  # 1 for a zero matrix
            plan.rank = chosen if plan.saves(chosen) else None
        elif params is None:
            plan.rank = full
    if params is not None:  # every parameter but the target weights stays: their biases and all other layers
        fixed = sum(p.numel() for p in model.parameters()) - sum(_weight_params(plan.module) for plan in plans)
        _choose_by_budget(plans, params, fixed)
    table = pd.DataFrame([_replace(model, plan) for plan in plans], columns=list(COMPRESSION_COLUMNS))
    table["rank"] = table["rank"].astype("Int64")  # <NA> for a layer left dense
    return table


def _weight_params(module: nn.Module) -> int:
    """The parameters of a layer's weight (its factors, if compressed), its bias left out."""
    if isinstance(module, LowRankLinear):
        return module.up.weight.numel() + module.down.weight.numel()
    return module.weight.numel()


def _replace(model: nn.Module, plan: _Plan) -> dict[str, object]:
    """Put the plan's factors (or, for a rank of None, the dense W_k of all values) in place of its layer."""
    module = plan.module
    out, in_ = plan.shape
    bias = module.up.bias if isinstance(module, LowRankLinear) else module.bias
    before = sum(p.numel() for p in module.parameters())
    weight = module.up.weight if isinstance(module, LowRankLinear) else module.weight
    if plan.rank is None:
        energy = 1.0
        if isinstance(module, LowRankLinear):  # made dense again: the product, as a linear layer
            dense = nn.Linear(in_, out, bias=bias is not None, device=weight.device, dtype=weight.dtype)
            with torch.no_grad():
                dense.weight.copy_(module.weight_product())
                if bias is not None:
                    dense.bias.copy_(bias)
            _set(model, plan.name, dense)
        after = sum(p.numel() for p in model.get_submodule(plan.name).parameters())
    else:
        kept = plan.rank
        energy = plan.energy(kept)
        root = plan.s[:kept].sqrt()
        up = (plan.u[:, :kept] * root).to(weight.dtype).contiguous()  # (out, k)
        down = (root[:, None] * plan.vh[:kept]).to(weight.dtype).contiguous()  # (k, in)
        layer = LowRankLinear(down, up, None if bias is None else bias.detach())
        layer.train(module.training)
        for param in layer.parameters():
            param.requires_grad_(weight.requires_grad)
        _set(model, plan.name, layer)
        after = sum(p.numel() for p in layer.parameters())
    return {"layer": plan.name, "shape": f"{out} x {in_}", "rank": plan.rank,
            "factored": plan.rank is not None, "energy": energy, "params_before": before, "params_after": after,
            "error": float(np.sqrt(max(0.0, 1.0 - energy)))}


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def compressed_ranks(model: nn.Module) -> dict[str, int]:
    """Layer name -> k of every compressed layer, in module order: what rebuilds the model (``factorize``)."""
    return {name: m.rank for name, m in model.named_modules() if isinstance(m, LowRankLinear)}


def factorize(model: nn.Module, ranks: Mapping[str, int]) -> nn.Module:
    """``model`` with each layer of ``ranks`` replaced by its truncated SVD at that rank (in place; returned).

    The model is the original (dense) one; its factors are recomputed, so a checkpoint of the
    compressed run loads onto them.
    """
    compress(model, ranks=dict(ranks))
    return model


