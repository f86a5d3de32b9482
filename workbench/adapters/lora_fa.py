"""LoRA-FA: LoRA with A frozen (Zhang et al., 2023, https://arxiv.org/abs/2308.03303)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .layer import AdapterLayer
from .lora import LoRA, LoRALinear
from .variant import register


class _FrozenAProjection(torch.autograd.Function):
    """y = s (x A^T) B^T, saving only the rank-r projection z = x A^T for backward.

    With A frozen, dL/dB = s g^T z needs z (..., r) and dL/dx = s (g B) A needs only the
    weights, so the layer input x (..., in) is never kept: activation memory falls by in / r.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
        z = x @ a.T  # (..., r)
        ctx.save_for_backward(z, a, b)
        ctx.scaling = scaling
        return (z @ b.T) * scaling  # (..., out)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, torch.Tensor | None, None]:
        z, a, b = ctx.saved_tensors
        grad = grad * ctx.scaling
        grad_x = (grad @ b) @ a if ctx.needs_input_grad[0] else None  # (..., in)
        grad_b = None
        if ctx.needs_input_grad[2]:
            grad_b = grad.reshape(-1, grad.shape[-1]).T @ z.reshape(-1, z.shape[-1])  # (out, r)
        return grad_x, None, grad_b, None


class LoRAFALinear(LoRALinear):
    """LoRA-FA on a linear layer: h = W x + b + s B A dropout(x) with A frozen after its init.

    Only B (out, r) trains; A (r, in) keeps its Kaiming-uniform draw (with ``init="pissa"``: the
    SVD factor sqrt(S_r / s) V_r^T) and is stored as a parameter with ``requires_grad=False``.
    The backward keeps A x (..., r) instead of x (..., in). Same arguments as ``LoRALinear``.
    """

    variant = "lora-fa"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lora_A.requires_grad_(False)

    def update(self, x: torch.Tensor) -> torch.Tensor:
        return _FrozenAProjection.apply(self.dropout(x), self.lora_A, self.lora_B, self.scaling)

    add_update = AdapterLayer.add_update  # result + update(x): the backward above, not LoRA's addmm

    def adapter_params(self) -> dict[str, nn.Parameter]:
        return {"lora_B": self.lora_B}


@register
class LoRAFA(LoRA):
    """``"lora-fa"``: options ``dropout``, ``rslora`` and ``init``, as for ``"lora"``."""

    name = "lora-fa"
    layer = LoRAFALinear
