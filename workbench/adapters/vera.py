"""VeRA: vector-based random matrix adaptation (Kopiczko et al., 2024, https://arxiv.org/abs/2310.11454)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from .layer import AdapterLayer, linear_shape
from .variant import FieldReader, PeftTensors, Variant, count_option, dropout_option, number_option, register

if TYPE_CHECKING:
    from ..adapt import AdapterConfig


def vera_projections(rank: int, max_in: int, max_out: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The shared frozen pair A (r, max_in) and B (max_out, r), regenerated from ``seed``.

    Both are Kaiming-uniform for ReLU, U(-sqrt(6 / fan_in), sqrt(6 / fan_in)), drawn A first,
    then B, from one CPU generator seeded with ``seed``: the same draw as peft's
    ``projection_prng_key``, so adapters travel between the two without the matrices.
    """
    generator = torch.Generator(device="cpu").manual_seed(seed)
    a = nn.init.kaiming_uniform_(torch.empty(rank, max_in), nonlinearity="relu", generator=generator)
    b = nn.init.kaiming_uniform_(torch.empty(max_out, rank), nonlinearity="relu", generator=generator)
    return a, b


class VeRALinear(AdapterLayer):
    """VeRA on a linear layer: h = W x + b + diag(b_vec) B diag(d) A dropout(x).

    A (r, in) and B (out, r) are the top-left slices of the model-wide frozen random pair
    (``vera_projections``); only the vectors d (r,) and b_vec (out,) train. With b_vec = 0 at
    init the update starts at zero. The pair is a non-persistent buffer shared by every layer:
    it is not in the state dict, since the seed regenerates it.

    Args:
        base_layer: the ``nn.Linear`` or ``Conv1D`` to adapt.
        projection_a: the shared A, (r, max_in) with max_in >= in.
        projection_b: the shared B, (max_out, r) with max_out >= out.
        d_initial: the initial value of every entry of d.
        dropout: dropout probability on the adapter path's input.
    """

    variant = "vera"

    def __init__(
        self,
        base_layer: nn.Module,
        projection_a: torch.Tensor,
        projection_b: torch.Tensor,
        d_initial: float = 0.1,
        dropout: float = 0.0,
    ) -> None:
        super().__init__(base_layer, projection_a.shape[0])
        weight = base_layer.weight
        self.register_buffer("vera_A", projection_a, persistent=False)
        self.register_buffer("vera_B", projection_b, persistent=False)
        self.vera_lambda_d = nn.Parameter(weight.new_full((self.rank,), d_initial))
        self.vera_lambda_b = nn.Parameter(weight.new_zeros(self.out_features))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def _projections(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.vera_A[:, : self.in_features], self.vera_B[: self.out_features, :]

    def update(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in) -> (..., out): b_vec * (B (d * (A dropout(x))))."""
        a, b = self._projections()
        return self.vera_lambda_b * F.linear(self.vera_lambda_d * F.linear(self.dropout(x), a), b)

    def delta_weight(self) -> torch.Tensor:
        """diag(b_vec) B diag(d) A, (out, in)."""
        a, b = self._projections()
        return (self.vera_lambda_b[:, None] * b) @ (self.vera_lambda_d[:, None] * a)

    def adapter_params(self) -> dict[str, nn.Parameter]:
        return {"vera_lambda_d": self.vera_lambda_d, "vera_lambda_b": self.vera_lambda_b}


@register
class VeRA(Variant):
    """``"vera"``: options ``d_initial`` (default 0.1), ``dropout`` (0.0), ``projection_seed`` (0).

    There is no alpha, and r may exceed a layer's dimensions (the paper uses r = 1024 on
    768-wide layers): the trainable count per layer is r + out whatever the rank.
    """

    name = "vera"
    options = {
        "d_initial": number_option(0.1, "the initial value of every entry of the trainable scaling vector d"),
        "dropout": dropout_option(),
        "projection_seed": count_option(
            0, "the seed of the frozen random projections A and B shared by every layer (peft's projection_prng_key)"
        ),
    }
    uses_alpha = False
    rank_limited = False
    reducible = False  # A and B are shared by every layer: no layer's update can be truncated alone
    peft_type = "VERA"
    peft_tensors = ("vera_lambda_d", "vera_lambda_b")
    peft_shared = ("vera_A", "vera_B")

    def build(
        self, bases: Mapping[str, nn.Module], rank: int, alpha: float, options: Mapping[str, Any]
    ) -> dict[str, AdapterLayer]:
        shapes = [linear_shape(base) for base in bases.values()]
        a, b = vera_projections(
            rank, max(i for i, _ in shapes), max(o for _, o in shapes), options["projection_seed"]
        )
        weight = next(iter(bases.values())).weight
        a, b = a.to(weight.device, weight.dtype), b.to(weight.device, weight.dtype)
        return {
            name: VeRALinear(base, a, b, d_initial=options["d_initial"], dropout=options["dropout"])
            for name, base in bases.items()
        }

    def to_peft(
        self, layers: Mapping[str, AdapterLayer], config: AdapterConfig
    ) -> tuple[PeftTensors, dict[str, Any]]:
        """peft's VeRA: each layer's d and b_vec, and the shared projections saved with them.

        peft regenerates the same projections from ``projection_prng_key`` (``vera_projections``);
        saving them too (``save_projection``) keeps the file valid whatever generator peft uses.
        """
        first = next(iter(layers.values()))
        tensors = PeftTensors(
            {name: {"vera_lambda_d": layer.vera_lambda_d, "vera_lambda_b": layer.vera_lambda_b}
             for name, layer in layers.items()},
            {"vera_A": first.vera_A, "vera_B": first.vera_B},
        )
        fields = {
            "r": config.rank,
            "projection_prng_key": config.options["projection_seed"],
            "save_projection": True,
            "vera_dropout": config.options["dropout"],
            "d_initial": config.options["d_initial"],
            "init_weights": True,
        }
        return tensors, fields

    def from_peft(self, field: FieldReader) -> dict[str, Any]:
        """The options of a peft VeRA; the projections come from the file when it holds them, else from the seed."""
        return {
            "d_initial": field("d_initial", float, 0.1),
            "dropout": field("vera_dropout", float, 0.0),
            "projection_seed": field("projection_prng_key", int, 0),
        }
