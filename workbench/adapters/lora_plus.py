"""LoRA+: LoRA with a larger learning rate for B (Hayou et al., 2024, https://arxiv.org/abs/2402.12354)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .layer import AdapterLayer
from .lora import LoRA
from .variant import positive_option, register


@register
class LoRAPlus(LoRA):
    """``"lora-plus"``: the LoRA layer, trained with lr_B = ``lr_ratio`` x lr_A.

    The paper shows that for wide layers A and B need different step sizes for feature
    learning to be efficient; its default ratio is 16. Options: ``dropout``, ``rslora``, ``init`` as
    for ``"lora"``, and ``lr_ratio`` (default 16).
    """

    name = "lora-plus"
    options = {**LoRA.options, "lr_ratio": positive_option(16.0, "B's learning rate over A's: lr_B = lr_ratio x lr")}

    def param_groups(
        self, layers: Sequence[AdapterLayer], lr: float, options: Mapping[str, Any]
    ) -> list[dict[str, Any]]:
        """Two groups: every A at ``lr``, every B at ``lr * lr_ratio``."""
        return [
            {"params": [layer.lora_A for layer in layers], "lr": lr},
            {"params": [layer.lora_B for layer in layers], "lr": lr * options["lr_ratio"]},
        ]
