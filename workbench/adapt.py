"""Putting adapters on a model, folding them in, and taking them off again."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .adapters import AdapterLayer, adapter_layers, get_variant, linear_shape
from .targets import Targets, find_targets

_CONFIG = "_workbench_adapter_config"


@dataclass(frozen=True)
class AdapterConfig:
    """How a model was adapted: what ``add_adapters`` was given, with targets resolved.

    Attributes:
        variant: one of ``wb.VARIANTS``.
        rank: r; after ``wb.reduce_rank``, the largest layer rank.
        alpha: the scale numerator (None for vera, which has none). Every layer's scale is
            s = alpha / rank (alpha / sqrt(rank) with rslora) of this config, also after
            ``wb.reduce_rank``, which rescales alpha with the rank so that s stays the same.
        targets: the qualified names of the adapted layers, in module order.
        options: every option of the variant, defaults filled in.
        requires_grad: each parameter's ``requires_grad`` before adapting, restored on removal.
        layer_ranks: qualified name -> rank of every layer when ``wb.reduce_rank`` left the
            layers with different ranks; empty while every layer has ``rank``.
    """

    variant: str
    rank: int
    alpha: float | None
    targets: tuple[str, ...]
    options: dict[str, Any]
    requires_grad: dict[str, bool] = field(repr=False, default_factory=dict)
    layer_ranks: dict[str, int] = field(default_factory=dict)

    def ranks(self) -> dict[str, int]:
        """Every adapted layer's rank, by qualified name."""
        return {name: self.layer_ranks.get(name, self.rank) for name in self.targets}


def adapter_config(model: nn.Module) -> AdapterConfig:
    """The ``AdapterConfig`` of an adapted model.

    Raises:
        ValueError: the model has no adapters.
    """
    config = getattr(model, _CONFIG, None)
    if config is None:
        raise ValueError("the model has no adapters; add them with wb.add_adapters(model, variant, rank)")
    return config


def replace_config(model: nn.Module, **changes: Any) -> AdapterConfig:
    """Record that the adapters changed shape (``wb.reduce_rank``): the config with ``changes``, stored."""
    config = dataclasses.replace(adapter_config(model), **changes)
    setattr(model, _CONFIG, config)
    return config


def refuse_adapted(model: nn.Module) -> None:
    """Raise ``ValueError`` if ``model`` has adapters already: a model is adapted once."""
    if getattr(model, _CONFIG, None) is not None or any(True for _ in adapter_layers(model)):
        raise ValueError("the model already has adapters; call wb.remove_adapters(model) before adding new ones")


def add_adapters(
    model: nn.Module,
    variant: str,
    rank: int,
    alpha: float | None = None,
    targets: Targets = None,
    **options: Any,
) -> nn.Module:
    """Wrap every targeted layer in an adapter of ``variant`` and freeze everything else.

    Each selected ``nn.Linear`` or ``Conv1D`` is replaced in place by the variant's adapter
    layer, which keeps the original module as ``base_layer``. Afterwards only the adapters'
    trainable tensors have ``requires_grad=True``. At initialisation the outputs are unchanged:
    every variant's update starts at zero, or, with ``init="pissa"`` (lora, lora-fa, delta-lora,
    lora-plus), A and B start as the top-r SVD of W and the frozen weight is the residual.

    Args:
        model: any ``nn.Module``, e.g. a transformers model built from a config.
        variant: one of ``wb.VARIANTS``.
        rank: r >= 1; for the LoRA family at most min(in, out) of every targeted layer.
        alpha: the scale numerator of alpha / r; ``None`` means alpha = r (scale 1). Not used by vera.
        targets: see ``find_targets``: exact names, suffixes such as ``"q_proj"``, or regular
            expressions; ``None`` means every supported linear layer.
        **options: the variant's own options, e.g. ``dropout=0.1`` for lora, ``init="pissa"``.

    Returns:
        The same model, adapted.

    Raises:
        ValueError: unknown variant or option, invalid rank, alpha or option value, targets that
            match nothing, or a model that already has adapters. The model is then unchanged.
    """
    refuse_adapted(model)
    spec = get_variant(variant)
    if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
        raise ValueError(f"rank must be an integer >= 1, not {rank!r}")
    if not spec.uses_alpha:
        if alpha is not None:
            raise ValueError(f"variant {variant!r} has no alpha scaling; leave alpha=None")
    elif alpha is None:
        alpha = float(rank)
    elif not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or alpha <= 0:
        raise ValueError(f"alpha must be a number > 0 (or None for alpha = rank), not {alpha!r}")
    resolved = spec.resolve_options(options)
    bases = find_targets(model, targets)
    if spec.rank_limited:
        for name, base in bases.items():
            limit = min(linear_shape(base))
            if rank > limit:
                raise ValueError(
                    f"rank {rank} is larger than layer {name!r} allows: at most min(in, out) = {limit}"
                )
    layers = spec.build(bases, rank, alpha, resolved)

    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    model.requires_grad_(False)
    for name, layer in layers.items():
        _replace(model, name, layer)
        for param in layer.adapter_params().values():
            param.requires_grad_(True)
    config = AdapterConfig(variant, rank, alpha, tuple(layers), resolved, requires_grad)
    setattr(model, _CONFIG, config)
    return model


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    parent.register_module(child, module)


def _layers(model: nn.Module) -> list[tuple[str, AdapterLayer]]:
    adapter_config(model)
    return list(adapter_layers(model))


def merge_adapters(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight, W <- W + delta W, for inference without overhead.

    The adapters stay in place (``unmerge_adapters`` takes the update out again); merging twice
    does nothing. Returns the model.
    """
    for _, layer in _layers(model):
        layer.merge()
    return model


def unmerge_adapters(model: nn.Module) -> nn.Module:
    """Take every merged update out of its base weight again, W <- W - delta W. Returns the model."""
    for _, layer in _layers(model):
        layer.unmerge()
    return model


def remove_adapters(model: nn.Module, merge: bool = False) -> nn.Module:
    """Put the original modules back and restore every parameter's ``requires_grad``.

    Args:
        merge: fold each update into its base weight first (keep what was learnt), instead of
            discarding it. Delta-LoRA's moved weights stay moved either way: they are the base.
            Without merging, a PiSSA layer gives back the original W = W_res + s B0 A0 (within
            float rounding), not the residual it trained on; with merging, W_res + s B A.

    Returns:
        The model, with no adapter left.
    """
    config = adapter_config(model)
    for name, layer in _layers(model):
        if merge:
            layer.merge()
        else:
            layer.unmerge()
            layer.restore_base_weight()
        _replace(model, name, layer.base_layer)
    for name, param in model.named_parameters():
        param.requires_grad_(config.requires_grad.get(name, param.requires_grad))
    delattr(model, _CONFIG)
    return model


def trainable_parameters(model: nn.Module) -> int:
    """The number of scalars with ``requires_grad=True``, each shared tensor counted once."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
