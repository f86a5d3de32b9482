"""Optimizers that carry each variant's training rule."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .adapt import adapter_config
from .adapters import adapter_layers, get_variant

OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "adamw": torch.optim.AdamW,
    "adam": torch.optim.Adam,
    "sgd": torch.optim.SGD,
}


def make_optimizer(model: nn.Module, lr: float, optimizer: str = "adamw", **kwargs: Any) -> torch.optim.Optimizer:
    """An optimizer for an adapted model, with the variant's rule built in.

    LoRA+ gets its two parameter groups (lr for A, ``lr_ratio`` x lr for B); Delta-LoRA gets
    its weight update as step hooks. Any trainable parameter outside the adapters (a head the
    user unfroze, say) is trained too, at ``lr``.

    Args:
        model: a model adapted with ``wb.add_adapters``.
        lr: the base learning rate.
        optimizer: ``"adamw"``, ``"adam"`` or ``"sgd"``.
        **kwargs: passed to the optimizer class, e.g. ``weight_decay=0.01``.

    Raises:
        ValueError: unknown optimizer, lr <= 0, or a model without adapters.
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; valid optimizers: {', '.join(OPTIMIZERS)}")
    if not isinstance(lr, (int, float)) or isinstance(lr, bool) or lr <= 0:
        raise ValueError(f"lr must be a number > 0, not {lr!r}")
    config = adapter_config(model)
    variant = get_variant(config.variant)
    layers = [layer for _, layer in adapter_layers(model)]
    groups = variant.param_groups(layers, lr, config.options)
    grouped = {id(p) for group in groups for p in group["params"]}
    others = [p for p in model.parameters() if p.requires_grad and id(p) not in grouped]
    if others:
        groups.append({"params": others, "lr": lr})
    result = OPTIMIZERS[optimizer](groups, lr=lr, **kwargs)
    variant.attach(result, layers)
    return result
