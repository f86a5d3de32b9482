"""The singular values of adapter updates: spectra, effective ranks, and rank reduction.

Every adapter layer's update is a matrix delta W = ``layer.delta_weight()`` (out, in) of rank at
most r. Its SVD delta W = U S V^T says how much of the update each direction carries:

- ``spectrum``: the top min(r, out, in) singular values of every layer, with the cumulative
  energy sum_{j<=i} s_j^2 / sum_j s_j^2;
- ``effective_rank``: per layer, the smallest r' whose energy reaches a threshold;
- ``reduce_rank``: replace each update by its truncated SVD, the best rank-r' approximation in
  Frobenius norm (Eckart-Young), refactored into smaller A (r', in) and B (out, r');
- ``spectrum_over_checkpoints``: effective ranks at every checkpoint of a run.

Only variants whose update is s B A with factors of each layer's own can be reduced (the
variant's ``reducible``: the LoRA family); VeRA's frozen projections are shared by all layers
and cannot be truncated per layer.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from .adapt import adapter_config, replace_config
from .adapters import AdapterLayer, LoRALinear, adapter_layers, alpha_for_rank, get_variant, svd_factors, variant_names
from .checkpoints import CheckpointError, read_progress
from .checks import is_integer, is_number

SPECTRUM_COLUMNS = ("layer", "index", "value", "energy")


def cumulative_energy(values: torch.Tensor) -> np.ndarray:
    """sum_{j<=i} s_j^2 / sum_j s_j^2 for each i, in float64; all NaN when every s_j is 0."""
    squares = np.cumsum(values.detach().double().cpu().numpy() ** 2)
    if not len(squares) or squares[-1] == 0:
        return np.full(len(squares), np.nan)
    return squares / squares[-1]


def _top_singular_values(layer: AdapterLayer) -> torch.Tensor:
    """The top min(r, out, in) singular values of the layer's update, largest first (the rest are 0)."""
    count = min(layer.rank, layer.in_features, layer.out_features)
    with torch.no_grad():
        return torch.linalg.svdvals(layer.delta_weight().float())[:count]


def spectrum(model: nn.Module) -> pd.DataFrame:
    """The singular values of every adapter's update, as a long table.

    Args:
        model: an adapted model (``wb.spectrum`` also takes a run's checkpoint directory).

    Returns:
        One row per layer and singular value, layers in module order: ``layer`` (qualified name),
        ``index`` (1 for the largest), ``value`` (s_index of delta W = ``layer.delta_weight()``)
        and ``energy`` (sum_{j<=index} s_j^2 / sum_j s_j^2, the fraction of ||delta W||_F^2 that
        the best rank-``index`` approximation keeps; NaN for an update that is exactly zero).
        A layer of rank r has min(r, out, in) rows: the update has no more nonzero values.

    Raises:
        ValueError: the model has no adapters, or its variant's update is not of rank r (DoRA's).
    """
    variant = get_variant(adapter_config(model).variant)
    if not variant.low_rank_update:
        low_rank = [name for name in variant_names() if get_variant(name).low_rank_update]
        raise ValueError(
            f"variant {variant.name!r} has no low-rank spectrum: its update W' - W is not of rank r; variants "
            f"whose update is: {', '.join(low_rank)}"
        )
    rows = []
    for name, layer in adapter_layers(model):
        values = _top_singular_values(layer)
        for index, (value, energy) in enumerate(zip(values.tolist(), cumulative_energy(values), strict=True)):
            rows.append({"layer": name, "index": index + 1, "value": value, "energy": float(energy)})
    return pd.DataFrame(rows, columns=list(SPECTRUM_COLUMNS))


def check_energy(energy: object) -> float:
    if not is_number(energy) or not 0 < energy <= 1:
        raise ValueError(f"energy must be a number in (0, 1], e.g. 0.9, not {energy!r}")
    return float(energy)


def smallest_rank(cumulative: np.ndarray, energy: float) -> int:
    """The smallest r' with cumulative[r' - 1] >= energy; 0 when the update is zero (all NaN)."""
    reached = np.flatnonzero(cumulative >= energy)
    return int(reached[0]) + 1 if len(reached) else 0


def effective_rank(spectrum_or_model: pd.DataFrame | nn.Module, energy: float = 0.9) -> pd.Series:
    """Per layer, the smallest rank r' whose truncated SVD keeps at least ``energy`` of the update.

    r' = min{i : sum_{j<=i} s_j^2 >= energy * sum_j s_j^2}; 0 for an update that is exactly zero
    (an adapter that has not moved from B A = 0).

    Args:
        spectrum_or_model: a table from ``wb.spectrum`` (any rows with its columns), an adapted
            model, or a run's checkpoint directory.
        energy: the fraction of squared singular values to keep, in (0, 1].

    Returns:
        A Series of ints named ``"effective_rank"``, indexed by layer name (module order).

    Raises:
        ValueError: energy out of range, a table without the spectrum's columns, or a model
            without adapters.
    """
    energy = check_energy(energy)
    table = spectrum_or_model if isinstance(spectrum_or_model, pd.DataFrame) else spectrum(spectrum_or_model)
    missing = [column for column in SPECTRUM_COLUMNS if column not in table.columns]
    if missing:
        raise ValueError(f"the table lacks {', '.join(missing)}; pass wb.spectrum(model)'s table")
    ranks = {
        layer: smallest_rank(rows.sort_values("index")["energy"].to_numpy(dtype=float), energy)
        for layer, rows in table.groupby("layer", sort=False)
    }
    return pd.Series(ranks, name="effective_rank", dtype=int).rename_axis("layer")


def _lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    config = adapter_config(model)
    layers = dict(adapter_layers(model))
    if not get_variant(config.variant).reducible:
        reducible = [name for name in variant_names() if get_variant(name).reducible]
        raise ValueError(
            f"variant {config.variant!r} cannot be rank-reduced: its update is not a product s B A of each "
            f"layer's own factors; variants that can: {', '.join(reducible)}"
        )
    merged = [name for name, layer in layers.items() if layer.merged]
    if merged:
        raise ValueError(f"layer {merged[0]!r} is merged; call wb.unmerge_adapters(model) before reducing ranks")
    return layers


def _target_ranks(layers: Mapping[str, LoRALinear], rank: int | Mapping[str, int]) -> dict[str, int | None]:
    """Each layer's asked rank (None: keep), checked against its current rank."""
    if is_integer(rank):
        wanted: dict[str, int | None] = dict.fromkeys(layers, rank)
    elif isinstance(rank, Mapping):
        unknown = [name for name in rank if name not in layers]
        if unknown:
            raise ValueError(f"{unknown[0]!r} is not an adapted layer; valid layers: {', '.join(layers)}")
        wanted = {name: rank.get(name) for name in layers}
    else:
        raise ValueError(f"rank must be an integer >= 1 or a dict of layer name -> rank, not {rank!r}")
    for name, value in wanted.items():
        if value is not None and (not is_integer(value) or not 1 <= value <= layers[name].rank):
            raise ValueError(
                f"rank {value!r} for layer {name!r} is invalid: expected an integer from 1 to its current "
                f"rank {layers[name].rank}"
            )
    return wanted


def _truncate(layer: LoRALinear, rank: int | None, energy: float | None) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(A', B', kept energy) of the best rank-r' approximation of the layer's update.

    r' is ``rank``, or the smallest rank keeping ``energy`` of the update's spectrum (as
    ``spectrum`` reports it); the factors are ``svd_factors`` of s B A at the layer's scale s.
    """
    values = _top_singular_values(layer)
    cumulative = cumulative_energy(values)
    if np.isnan(cumulative).all():  # delta W = 0: any factors with B' A' = 0 are optimal
        new_rank = rank if rank is not None else 1
        a, b = layer.lora_A.detach()[:new_rank], layer.lora_B.detach()[:, :new_rank]
        if torch.count_nonzero(b @ a):
            a, b = torch.zeros_like(a), torch.zeros_like(b)
        return a.clone(), b.clone(), 1.0  # keeping B = 0 and A's draw lets training go on
    new_rank = rank if rank is not None else smallest_rank(cumulative, energy)
    a, b = svd_factors(layer.delta_weight().detach(), new_rank, layer.scaling, layer.lora_A.dtype)
    return a, b, float(cumulative[new_rank - 1])


def reduce_rank(
    model: nn.Module, rank: int | Mapping[str, int] | None = None, energy: float | None = None
) -> pd.DataFrame:
    """Replace every adapter's update s B A by its best rank-r' approximation (truncated SVD).

    With s B A = U S V^T, the new factors are B' = U_r' sqrt(S_r' / s) and A' = sqrt(S_r' / s)
    V_r'^T, so s B' A' = U_r' S_r' V_r'^T, optimal in Frobenius norm (Eckart-Young): the
    relative error is sqrt(sum_{i>r'} s_i^2 / sum_i s_i^2). The scale s stays as it was; the
    adapter config's ``rank`` becomes the largest new rank, ``alpha`` is rescaled so that
    alpha / rank (or alpha / sqrt(rank) with rslora) is still s, and when the layers end up
    with different ranks ``config.layer_ranks`` records each. The frozen weights do not change
    (PiSSA's residual and Delta-LoRA's moved weight stay as they are); LoRA-FA's A' stays frozen.

    Give exactly one of:
        rank: r' for every layer (1 <= r' <= each layer's rank), or a dict of layer name -> r'
            (layers not named keep their rank), e.g. ``{"fc1": 2, "fc2": 4}``.
        energy: in (0, 1]: per layer, the smallest r' keeping at least this fraction of the
            squared singular values (see ``wb.effective_rank``).

    A layer whose update is exactly zero (untrained, B = 0) keeps slices of its factors, so
    B' A' = 0 still and training can go on. The parameters are new tensors: build the optimizer
    again (``wb.make_optimizer``) after reducing. A checkpoint of the reduced model records the
    ranks; ``wb.load_run_model`` reshapes the rebuilt model to them (``wb.match_ranks``).

    Returns:
        One row per layer: layer, old_rank, new_rank, kept_energy (the fraction of
        ||delta W||_F^2 kept) and relative_error (||delta W - delta W'||_F / ||delta W||_F,
        measured on the layer after the change; 0 for a zero update).

    Raises:
        ValueError: both or neither of rank and energy, a rank above a layer's current one or
            below 1, an unknown layer name, energy out of (0, 1], a model without adapters, a
            merged model, or vera adapters. Everything is checked first: the model is then unchanged.
    """
    layers = _lora_layers(model)
    if (rank is None) == (energy is None):
        raise ValueError("give exactly one of rank= (an integer, or a dict of layer -> rank) or energy= (in (0, 1])")
    wanted = _target_ranks(layers, rank) if rank is not None else dict.fromkeys(layers)
    energy = check_energy(energy) if energy is not None else None
    config = adapter_config(model)
    plans = {
        name: _truncate(layer, wanted[name], energy)
        for name, layer in layers.items()
        if wanted[name] is not None or energy is not None
    }

    rows = []
    for name, layer in layers.items():
        old_rank = layer.rank
        if name not in plans:
            rows.append({"layer": name, "old_rank": old_rank, "new_rank": old_rank,
                         "kept_energy": 1.0, "relative_error": 0.0})
            continue
        a, b, kept = plans[name]
        with torch.no_grad():
            before = layer.delta_weight().float()
            layer.set_factors(a, b)
            norm = torch.linalg.norm(before)
            error = float(torch.linalg.norm(before - layer.delta_weight().float()) / norm) if norm > 0 else 0.0
        rows.append({"layer": name, "old_rank": old_rank, "new_rank": layer.rank,
                     "kept_energy": kept, "relative_error": error})

    ranks = {name: layer.rank for name, layer in layers.items()}
    top = max(ranks.values())
    alpha = config.alpha
    if top != config.rank:
        alpha = alpha_for_rank(config.alpha, config.rank, top, config.options.get("rslora", False))
    for layer in layers.values():
        layer.alpha = alpha
    uniform = len(set(ranks.values())) == 1
    replace_config(model, rank=top, alpha=alpha, layer_ranks={} if uniform else ranks)
    return pd.DataFrame(rows, columns=["layer", "old_rank", "new_rank", "kept_energy", "relative_error"])


def match_ranks(model: nn.Module, checkpoint: str | os.PathLike[str]) -> nn.Module:
    """Reshape a freshly built model's adapters to a rank-reduced checkpoint's ranks, so it loads.

    A checkpoint's progress.json records the adapter config, per-layer ranks included (see
    ``wb.reduce_rank``; read with ``workbench.checkpoints.read_progress``). When those ranks differ
    from the model's (same layers, each no larger), ``reduce_rank(model, rank=those ranks)`` is
    applied; otherwise nothing is done and
    ``CheckpointManager.load`` reports any mismatch. ``wb.load_run_model`` calls this itself;
    call it before ``CheckpointManager(...).load(checkpoint, model)`` on a model built as the
    run's was. Returns the model.
    """
    try:
        record = read_progress(Path(checkpoint))["adapter"]
    except CheckpointError:
        return model  # not readable here: loading says why
    if record is None:
        return model
    saved = {name: record.get("layer_ranks", {}).get(name, record["rank"]) for name in record["targets"]}
    layers = dict(adapter_layers(model))
    current = {name: layer.rank for name, layer in layers.items()}
    fits = saved.keys() == current.keys() and all(saved[name] <= current[name] for name in saved)
    if fits and saved != current and layers and get_variant(adapter_config(model).variant).reducible:
        reduce_rank(model, rank=saved)
    return model
