"""LoRA-FA: LoRA with A frozen (Zhang et al., 2023, https://arxiv.org/abs/2308.03303)."""

from __future__ import annotations

from typing import Any

from torch import nn

from .lora import LoRA, LoRALinear
from .variant import register


class LoRAFALinear(LoRALinear):
    """LoRA-FA on a linear layer: h = W x + b + s B A dropout(x) with A frozen after its init.

    Only B (out, r) trains; A (r, in) keeps its Kaiming-uniform draw (with ``init="pissa"``: the
    SVD factor sqrt(S_r / s) V_r^T) and is stored as a parameter with ``requires_grad=False``.
    Same arguments as ``LoRALinear``, and its forward: autograd saves for backward only what the
    gradients need, so with A frozen it keeps z = A x (..., r), for dL/dB = s g^T z, and never
    the layer input x (..., in), which only A's gradient needs: activation memory falls by in / r
    per adapted layer (``tests/test_variants.py`` counts the bytes).
    """

    variant = "lora-fa"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lora_A.requires_grad_(False)

    def adapter_params(self) -> dict[str, nn.Parameter]:
        return {"lora_B": self.lora_B}


@register
class LoRAFA(LoRA):
    """``"lora-fa"``: options ``dropout``, ``rslora`` and ``init``, as for ``"lora"``."""

    name = "lora-fa"
    layer = LoRAFALinear
