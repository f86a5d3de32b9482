"""What every adapter layer shares: the frozen linear layer it wraps, and merging.

A base layer computes h = W x + b with W of shape (out, in). Two kinds are supported:
``torch.nn.Linear`` (weight stored (out, in)) and transformers' GPT-2 ``Conv1D``
(weight stored transposed, (in, out)). Adapter code only ever sees W as (out, in).
"""

from __future__ import annotations

import sys
from abc import ABC, abstractmethod
from collections.abc import Iterator

import torch
from torch import nn


def is_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is transformers' ``Conv1D`` (GPT-2's linear layer, weight stored (in, out))."""
    # transformers is imported already if the model came from it; never import it here.
    utils = sys.modules.get("transformers.pytorch_utils")
    return utils is not None and isinstance(module, utils.Conv1D)


def is_supported(module: nn.Module) -> bool:
    """Whether an adapter can wrap ``module``: an ``nn.Linear`` or a transformers ``Conv1D``."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of a supported base layer."""
    if is_conv1d(module):
        return module.nx, module.nf
    return module.in_features, module.out_features


def linear_weight(module: nn.Module) -> torch.Tensor:
    """W of a supported base layer as an (out, in) view (Conv1D stores it (in, out)); writing to it writes the layer."""
    return module.weight.T if is_conv1d(module) else module.weight


class AdapterLayer(nn.Module, ABC):
    """A frozen base layer plus a trainable low-rank update.

    Every variant computes ``h = W x + b + u(x)`` where the update ``u`` is linear in x,
    so it has a matrix ``delta_weight()`` of shape (out, in) that merging adds to W.

    Args:
        base_layer: the wrapped ``nn.Linear`` or ``Conv1D``; kept as is, so removing the
            adapter gives back this very module (an init that changed its weight, PiSSA's,
            restores it: ``restore_base_weight``).
        rank: r, the rank of the update.

    Attributes:
        variant: the variant's name, one of ``wb.VARIANTS``.
        merged: whether the update is currently folded into W.
        merged_delta: what ``merge`` added to W, (out, in) in W's dtype, while merged (else None);
            a non-persistent buffer, so it moves with the layer but is never saved.
    """

    variant: str = ""

    def __init__(self, base_layer: nn.Module, rank: int) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = linear_shape(base_layer)
        self.rank = rank
        self.register_buffer("merged_delta", None, persistent=False)

    @property
    def merged(self) -> bool:
        return self.merged_delta is not None

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight as it stores it (for code that reads ``layer.weight``)."""
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def base_weight(self) -> torch.Tensor:
        """W as an (out, in) view of the base weight; writing to it writes the base layer."""
        return linear_weight(self.base_layer)

    @abstractmethod
    def update(self, x: torch.Tensor) -> torch.Tensor:
        """The adapter's contribution u(x): (..., in) -> (..., out)."""

    @abstractmethod
    def delta_weight(self) -> torch.Tensor:
        """The update's matrix, (out, in): u(x) = delta_weight() @ x without dropout."""

    @abstractmethod
    def adapter_params(self) -> dict[str, nn.Parameter]:
        """The adapter's trainable parameters by name (frozen adapter tensors excluded)."""

    def add_update(self, result: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``result`` (..., out) + u(x); a variant may fuse the sum into the update's last product."""
        return result + self.update(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in) -> (..., out): base_layer(x) + u(x), or base_layer(x) alone when merged."""
        result = self.base_layer(x)
        return result if self.merged else self.add_update(result, x)

    def initial_update(self) -> torch.Tensor | None:
        """The part of the original W that initialisation moved into the adapter, (out, in), or None.

        The default inits move nothing (the update starts at zero). PiSSA keeps W - s B0 A0 as the
        frozen weight; ``restore_base_weight`` adds s B0 A0 back when the adapter is removed.
        """
        return None

    @torch.no_grad()
    def restore_base_weight(self) -> None:
        """W <- W + ``initial_update()``: give back what the init took out of W (unmerged layers only)."""
        initial = self.initial_update()
        if initial is not None:
            weight = self.base_weight()
            weight.add_(initial.to(weight.dtype))

    @torch.no_grad()
    def merge(self) -> None:
        """W <- W + D with D = delta_weight(): one matrix product at inference, no adapter overhead.

        D is kept (``merged_delta``, in W's dtype) so that ``unmerge`` takes out exactly what was
        added, also for an update that depends on W. Merging a merged layer does nothing.
        """
        if not self.merged:
            weight = self.base_weight()
            delta = self.delta_weight().detach().to(weight.dtype)  # (out, in)
            weight.add_(delta)
            self.merged_delta = delta

    @torch.no_grad()
    def unmerge(self) -> None:
        """W <- W - D, the D that ``merge`` added: back to the unmerged W within float rounding.

        Recomputing D here would be wrong for an update that depends on W (it would see the merged
        W). Unmerging an unmerged layer does nothing.
        """
        if self.merged:
            weight = self.base_weight()
            weight.sub_(self.merged_delta)
            self.merged_delta = None

    def extra_repr(self) -> str:
        return f"variant={self.variant!r}, rank={self.rank}, merged={self.merged}"


def adapter_layers(model: nn.Module) -> Iterator[tuple[str, AdapterLayer]]:
    """The model's adapter layers with their qualified names, in module order."""
    for name, module in model.named_modules():
        if isinstance(module, AdapterLayer):
            yield name, module
