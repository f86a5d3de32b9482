"""Optimizers that carry each variant's training rule."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .adapt import AdapterConfig, adapter_config
from .adapters import adapter_layers, get_variant
from .checks import is_finite_number

OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "adamw": torch.optim.AdamW,
    "adam": torch.optim.Adam,
    "sgd": torch.optim.SGD,
}


def make_optimizer(model: nn.Module, lr: float, optimizer: str = "adamw", **kwargs: Any) -> torch.optim.Optimizer:
    """An optimizer for an adapted model, with the variant's rule built in.

    LoRA+ gets its two parameter groups (lr for A, ``lr_ratio`` x lr for B); Delta-LoRA gets
    its weight update as step hooks. Any trainable parameter outside the adapters (the modules
    of ``add_adapters(..., train=["classifier"])``, or a head the user unfroze) is trained too, in
    one more group at ``lr``. A model without adapters gets one group of every parameter with
    ``requires_grad`` (full fine-tuning, or a head on a frozen base).

    Args:
        model: a model adapted with ``wb.add_adapters``, or any model with trainable parameters.
        lr: the base learning rate.
        optimizer: ``"adamw"``, ``"adam"`` or ``"sgd"``.
        **kwargs: passed to the optimizer class, e.g. ``weight_decay=0.01``.

    Raises:
        ValueError: unknown optimizer, lr not a finite number > 0, or a model with nothing to train.
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; valid optimizers: {', '.join(OPTIMIZERS)}")
    if not is_finite_number(lr) or lr <= 0:
        raise ValueError(f"lr must be a finite number > 0, not {lr!r}")
    config = _config_or_none(model)
    variant = get_variant(config.variant) if config is not None else None
    layers = [layer for _, layer in adapter_layers(model)]
    groups = variant.param_groups(layers, lr, config.options) if variant is not None else []
    grouped = {id(p) for group in groups for p in group["params"]}
    others = [p for p in model.parameters() if p.requires_grad and id(p) not in grouped]
    if others:
        groups.append({"params": others, "lr": lr})
    if not groups:
        raise ValueError("the model has no parameter with requires_grad=True: add adapters (wb.add_adapters) "
                         "or unfreeze the parameters to train")
    result = OPTIMIZERS[optimizer](groups, lr=lr, **kwargs)
    if variant is not None:
        variant.attach(result, layers)
    return result


def _config_or_none(model: nn.Module) -> AdapterConfig | None:
    try:
        return adapter_config(model)
    except ValueError:  # a model without adapters: every trainable parameter in one group
        return None
