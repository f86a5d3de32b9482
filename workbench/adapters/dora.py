"""DoRA: weight-decomposed low-rank adaptation (Liu et al., 2024, https://arxiv.org/abs/2402.09353)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from .layer import AdapterLayer
from .lora import LoRA, LoRALinear
from .variant import PeftTensors, register

if TYPE_CHECKING:
    from ..adapt import AdapterConfig


class DoRALinear(LoRALinear):
    """DoRA on a linear layer: the adapted weight split into a magnitude and a LoRA-updated direction.

    With W (out, in) frozen, V = W + s B A its LoRA update (A (r, in), B (out, r), s as LoRA's), and
    n = ||V||_c the norm of each row of V (each output's weights, length out)::

        W' = diag(m / n) V        h = W' x + b

    The magnitude m (length out, trainable, ``lora_magnitude_vector`` as peft names it) starts as
    the row norms of W; with B = 0 at the start, n = m and W' = W. As the paper recommends
    (its section 4.3) and peft does, n is treated as a constant in backward: it is computed from
    the current factors without a gradient, so the gradient reaches m, A and B only through
    g = m / n and the LoRA path. The forward never forms W'; with g (out,) and d(x) the dropout
    on the adapter path's input::

        h = base(x) + (g - 1) * (W d(x)) + g * s B A d(x)

    which is W' x + b without dropout (W d(x) is then base(x) - b, reused, not recomputed; with
    dropout in training it is one more product with W, as in peft). It is computed as
    g * (W d(x) + s B A d(x)) - W d(x), which saves less for backward (``_combine``).

    Args: as ``LoRALinear``, without ``init`` (DoRA starts from B A = 0).
    """

    variant = "dora"

    def __init__(self, base_layer: nn.Module, rank: int, alpha: float, dropout: float = 0.0,
                 rslora: bool = False) -> None:
        super().__init__(base_layer, rank, alpha, dropout=dropout, rslora=rslora)
        # n at B = 0, computed as every forward computes it, so that g = m / n is exactly 1 at the start
        self.lora_magnitude_vector = nn.Parameter(self.direction_norm())

    def _updated_weight(self) -> torch.Tensor:
        """V = W + s B A, (out, in), in W's dtype."""
        weight = self.base_weight()
        return torch.addmm(weight, self.lora_B.to(weight.dtype), self.lora_A.to(weight.dtype), alpha=self.scaling)

    @torch.no_grad()
    def direction_norm(self) -> torch.Tensor:
        """n = ||W + s B A||_c, (out,): the row norms of the updated weight, without a gradient."""
        return torch.linalg.vector_norm(self._updated_weight(), dim=1)

    def update(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in) -> (..., out): (g - 1) * (W d(x)) + g * s B A d(x), what DoRA adds to base(x)."""
        dropped = self.dropout(x)
        return self._combine(F.linear(dropped, self.base_weight()), dropped)

    def add_update(self, result: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """result + ``update(x)``, with W d(x) read off result = W x + b when there is no dropout."""
        dropped = self.dropout(x)
        if dropped is x:
            frozen = result if self.bias is None else result - self.bias
        else:
            frozen = F.linear(dropped, self.base_weight())
        return result + self._combine(frozen, dropped)

    def _combine(self, frozen: torch.Tensor, dropped: torch.Tensor) -> torch.Tensor:
        """g * (W d(x) + s B A d(x)) - W d(x), with frozen = W d(x) and g = m / n, (..., out).

        Written so, autograd keeps one (..., out) tensor per layer, V d(x), for m's gradient (and
        A d(x), (..., r), for B's), not both W d(x) and B A d(x) as (g - 1) W d(x) + g s B A d(x) would.
        """
        scale = self.lora_magnitude_vector / self.direction_norm()  # g, (out,)
        low = F.linear(dropped, self.lora_A).reshape(-1, self.rank)  # A d(x), (N, r)
        updated = torch.addmm(frozen.reshape(-1, self.out_features), low, self.lora_B.T, alpha=self.scaling)
        return (scale * updated).view(frozen.shape) - frozen

    def delta_weight(self) -> torch.Tensor:
        """W' - W = diag(m / n) (W + s B A) - W, (out, in): not of rank r, as m rescales W's rows."""
        updated = self._updated_weight()
        norm = torch.linalg.vector_norm(updated.detach(), dim=1)  # n, a constant as in the forward
        return (self.lora_magnitude_vector / norm)[:, None] * updated - self.base_weight()

    def adapter_params(self) -> dict[str, nn.Parameter]:
        return {**super().adapter_params(), "lora_magnitude_vector": self.lora_magnitude_vector}


@register
class DoRA(LoRA):
    """``"dora"``: options ``dropout`` and ``rslora``, as for ``"lora"``.

    Exports to peft as a LoRA with ``use_dora=True`` and each layer's magnitude vector, and an
    adapter peft saved that way imports as DoRA. Not reducible and without a spectrum: its
    update W' - W rescales the rows of W, so it is not of rank r.
    """

    name = "dora"
    options = {key: LoRA.options[key] for key in ("dropout", "rslora")}
    layer = DoRALinear
    reducible = False
    low_rank_update = False
    peft_tensors = (*LoRA.peft_tensors, "lora_magnitude_vector")
    peft_fields = {"use_dora": True}

    def to_peft(
        self, layers: Mapping[str, AdapterLayer], config: AdapterConfig
    ) -> tuple[PeftTensors, dict[str, Any]]:
        """LoRA's tensors and fields, with each layer's magnitude and ``use_dora=True``."""
        tensors, fields = super().to_peft(layers, config)
        for name, layer in layers.items():
            tensors.layers[name]["lora_magnitude_vector"] = layer.lora_magnitude_vector
        return tensors, {**fields, **self.peft_fields}
