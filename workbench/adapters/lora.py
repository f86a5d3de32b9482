"""LoRA: low-rank adaptation (Hu et al., 2021, https://arxiv.org/abs/2106.09685)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .layer import AdapterLayer
from .variant import Variant, dropout_option, flag_option, register


def lora_a_init_(tensor: torch.Tensor) -> torch.Tensor:
    """A ~ Kaiming-uniform with a = sqrt(5): U(-1/sqrt(in), 1/sqrt(in)), as nn.Linear and peft do."""
    return nn.init.kaiming_uniform_(tensor, a=math.sqrt(5))


def lora_b_init_(tensor: torch.Tensor) -> torch.Tensor:
    """B = 0, so the adapted model starts exactly as the base model (B A = 0)."""
    return nn.init.zeros_(tensor)


def lora_scaling(alpha: float, rank: int, rslora: bool) -> float:
    """s = alpha / r, or alpha / sqrt(r) with rank-stabilised LoRA (Kalajdzievski, 2023)."""
    return alpha / math.sqrt(rank) if rslora else alpha / rank


class LoRALinear(AdapterLayer):
    """LoRA on a linear layer: h = W x + b + s B A dropout(x), with s = alpha / r.

    W (out, in) stays frozen; A (r, in) starts Kaiming-uniform and B (out, r) at zero, so
    delta W = s B A is 0 at initialisation and has rank at most r.

    Args:
        base_layer: the ``nn.Linear`` or ``Conv1D`` to adapt.
        rank: r, with 1 <= r <= min(in, out).
        alpha: the scale numerator.
        dropout: dropout probability on the adapter path's input (the base path has none).
        rslora: scale by alpha / sqrt(r) instead of alpha / r.
    """

    variant = "lora"

    def __init__(
        self, base_layer: nn.Module, rank: int, alpha: float, dropout: float = 0.0, rslora: bool = False
    ) -> None:
        super().__init__(base_layer, rank)
        weight = base_layer.weight
        self.alpha = alpha
        self.scaling = lora_scaling(alpha, rank, rslora)
        self.lora_A = nn.Parameter(lora_a_init_(weight.new_empty(rank, self.in_features)))
        self.lora_B = nn.Parameter(lora_b_init_(weight.new_empty(self.out_features, rank)))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def update(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in) -> (..., out): s B (A dropout(x))."""
        return F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        """s B A, (out, in)."""
        return (self.lora_B @ self.lora_A) * self.scaling

    def adapter_params(self) -> dict[str, nn.Parameter]:
        return {"lora_A": self.lora_A, "lora_B": self.lora_B}


@register
class LoRA(Variant):
    """``"lora"``: options ``dropout`` (default 0.0) and ``rslora`` (default False)."""

    name = "lora"
    options = {"dropout": dropout_option(), "rslora": flag_option()}
    layer: type[LoRALinear] = LoRALinear

    def build(
        self, bases: Mapping[str, nn.Module], rank: int, alpha: float, options: Mapping[str, Any]
    ) -> dict[str, AdapterLayer]:
        layer_options = {key: options[key] for key in ("dropout", "rslora") if key in options}
        layers = {}
        for name, base in bases.items():
            layer = self.layer(base, rank, alpha, **layer_options)
            layer.variant = self.name
            layers[name] = layer
        return layers
