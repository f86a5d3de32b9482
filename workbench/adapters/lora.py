"""LoRA: low-rank adaptation (Hu et al., 2021, https://arxiv.org/abs/2106.09685)."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from .layer import AdapterLayer
from .variant import FieldReader, PeftTensors, Variant, dropout_option, flag_option, init_option, register

if TYPE_CHECKING:
    from ..adapt import AdapterConfig


def lora_a_init_(tensor: torch.Tensor) -> torch.Tensor:
    """A ~ Kaiming-uniform with a = sqrt(5): U(-1/sqrt(in), 1/sqrt(in)), as nn.Linear and peft do."""
    return nn.init.kaiming_uniform_(tensor, a=math.sqrt(5))


def lora_b_init_(tensor: torch.Tensor) -> torch.Tensor:
    """B = 0, so the adapted model starts exactly as the base model (B A = 0)."""
    return nn.init.zeros_(tensor)


def lora_scaling(alpha: float, rank: int, rslora: bool) -> float:
    """s = alpha / r, or alpha / sqrt(r) with rank-stabilised LoRA (Kalajdzievski, 2023)."""
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def alpha_for_rank(alpha: float, rank: int, new_rank: int, rslora: bool) -> float:
    """The alpha' that keeps the scale s of (alpha, r) at rank r'.

    s = alpha / r = alpha' / r' gives alpha' = alpha r' / r; with rslora, s = alpha / sqrt(r) gives
    alpha' = alpha sqrt(r' / r). So ``lora_scaling(alpha', r', rslora) == lora_scaling(alpha, r, rslora)``:
    what rank reduction records, and what a peft export writes for a layer whose rank is not the config's.
    """
    ratio = new_rank / rank
    return alpha * (math.sqrt(ratio) if rslora else ratio)


def svd_factors(
    matrix: torch.Tensor, rank: int, scaling: float, dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """A (r, in) and B (out, r) with s B A the best rank-r approximation of ``matrix`` (out, in).

    With M = U S V^T (singular values descending) and its top r triplets::

        B = U_r sqrt(S_r / s)      (out, r)
        A = sqrt(S_r / s) V_r^T    (r, in)

    so s B A = U_r S_r V_r^T, optimal in Frobenius norm (Eckart-Young), with the scale split
    evenly between the factors: A A^T = B^T B = S_r / s. PiSSA's A0, B0 (M = W) and rank
    reduction's A', B' (M = s B A) are both these. As peft's ``pissa_init``, the SVD runs in
    float32; A and B come back in ``dtype`` (default: M's) and contiguous. ``torch.linalg.svd``
    returns column-major factors, and a layer holding those would run another matmul kernel than
    the same values loaded from a checkpoint, with outputs that differ in the last bits.
    """
    dtype = matrix.dtype if dtype is None else dtype
    u, singular, vh = torch.linalg.svd(matrix.detach().float(), full_matrices=False)
    root = torch.sqrt(singular[:rank] / scaling)
    b = u[:, :rank] * root  # (out, r), column-major as U
    a = root[:, None] * vh[:rank]  # (r, in)
    return a.to(dtype).contiguous(), b.to(dtype).contiguous()


class LoRALinear(AdapterLayer):
    """LoRA on a linear layer: h = W x + b + s B A dropout(x), with s = alpha / r.

    W (out, in) stays frozen; A (r, in) starts Kaiming-uniform and B (out, r) at zero, so
    delta W = s B A is 0 at initialisation and has rank at most r.

    With ``init="pissa"`` (PiSSA, Meng et al., 2024, https://arxiv.org/abs/2404.02948) A and B
    start as the principal part of W instead (``svd_factors`` of W: s B0 A0 = U_r S_r V_r^T) and
    the frozen weight becomes the residual W_res = W - s B0 A0, so the outputs are unchanged
    (within float rounding). A0 and B0 are kept as non-persistent buffers ``lora_A0``,
    ``lora_B0``: they are recomputed from W whenever the layer is built, so checkpoints need
    not hold them; they give W back on removal (``initial_update``) and make the peft export exact.

    Args:
        base_layer: the ``nn.Linear`` or ``Conv1D`` to adapt.
        rank: r, with 1 <= r <= min(in, out).
        alpha: the scale numerator.
        dropout: dropout probability on the adapter path's input (the base path has none).
        rslora: scale by alpha / sqrt(r) instead of alpha / r.
        init: ``"default"`` or ``"pissa"``.
    """

    variant = "lora"

    def __init__(
        self,
        base_layer: nn.Module,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        rslora: bool = False,
        init: str = "default",
    ) -> None:
        super().__init__(base_layer, rank)
        weight = base_layer.weight
        self.alpha = alpha
        self.scaling = lora_scaling(alpha, rank, rslora)
        self.init = init
        if init == "pissa":
            a, b = svd_factors(self.base_weight(), rank, self.scaling)
            with torch.no_grad():
                self.base_weight().sub_((b @ a) * self.scaling)  # W_res = W - s B0 A0
            self.register_buffer("lora_A0", a.clone(), persistent=False)
            self.register_buffer("lora_B0", b.clone(), persistent=False)
        else:
            a = lora_a_init_(weight.new_empty(rank, self.in_features))
            b = lora_b_init_(weight.new_empty(self.out_features, rank))
        self.lora_A = nn.Parameter(a)
        self.lora_B = nn.Parameter(b)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def update(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in) -> (..., out): s B (A dropout(x))."""
        return F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B) * self.scaling

    def add_update(self, result: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """result + s B (A dropout(x)) as one ``addmm(result, A x, B^T, alpha=s)``: (N, r) x (r, out) + (N, out).

        The scale and the sum happen inside the last product, which saves two passes over the
        (..., out) output, forward and backward, against adding ``update(x)``.
        """
        low = F.linear(self.dropout(x), self.lora_A)  # (..., r)
        return torch.addmm(result.reshape(-1, self.out_features), low.reshape(-1, low.shape[-1]), self.lora_B.T,
                           alpha=self.scaling).view(result.shape)

    def delta_weight(self) -> torch.Tensor:
        """s B A, (out, in)."""
        return (self.lora_B @ self.lora_A) * self.scaling

    def adapter_params(self) -> dict[str, nn.Parameter]:
        return {"lora_A": self.lora_A, "lora_B": self.lora_B}

    def initial_update(self) -> torch.Tensor | None:
        """s B0 A0 for PiSSA (what W_res lacks of W), else None."""
        if self.init != "pissa":
            return None
        return (self.lora_B0 @ self.lora_A0) * self.scaling

    @torch.no_grad()
    def set_factors(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """Replace A, B by ``a`` (r', in) and ``b`` (out, r'); the rank becomes r', the scale s stays.

        The new parameters keep the old ones' dtype, device and ``requires_grad`` (LoRA-FA's A stays
        frozen), and are stored contiguous whatever the layout of ``a`` and ``b``, as a checkpoint
        loads them (so the same matmul kernels run). They are new tensors: an optimizer built
        before must be rebuilt.
        """
        rank = a.shape[0]
        if a.shape != (rank, self.in_features) or b.shape != (self.out_features, rank):
            raise ValueError(
                f"factors of shapes {tuple(a.shape)}, {tuple(b.shape)} do not fit a ({self.out_features}, "
                f"{self.in_features}) layer: need (r, {self.in_features}) and ({self.out_features}, r)"
            )
        old_a, old_b = self.lora_A, self.lora_B
        self.lora_A = nn.Parameter(a.to(old_a).contiguous(), requires_grad=old_a.requires_grad)
        self.lora_B = nn.Parameter(b.to(old_b).contiguous(), requires_grad=old_b.requires_grad)
        self.rank = rank


@register
class LoRA(Variant):
    """``"lora"``: options ``dropout`` (default 0.0), ``rslora`` (default False), ``init`` ("default" or "pissa").

    The LoRA family (this and the variants built on it) exports to peft as a plain LoRA, since
    each one's forward is W x + s B A x (see ``to_peft``), and can be rank-reduced.
    """

    name = "lora"
    options = {
        "dropout": dropout_option(),
        "rslora": flag_option(False, "rank-stabilised LoRA: scale the update by alpha / sqrt(r) instead of alpha / r"),
        "init": init_option(),
    }
    layer: type[LoRALinear] = LoRALinear
    reducible = True
    peft_type = "LORA"
    peft_tensors = ("lora_A.weight", "lora_B.weight")

    def build(
        self, bases: Mapping[str, nn.Module], rank: int, alpha: float, options: Mapping[str, Any]
    ) -> dict[str, AdapterLayer]:
        layer_options = {key: options[key] for key in ("dropout", "rslora", "init") if key in options}
        layers = {}
        for name, base in bases.items():
            layer = self.layer(base, rank, alpha, **layer_options)
            layer.variant = self.name
            layers[name] = layer
        return layers

    def to_peft(
        self, layers: Mapping[str, AdapterLayer], config: AdapterConfig
    ) -> tuple[PeftTensors, dict[str, Any]]:
        """Each layer as a peft LoRA with the same forward, W x + s B A x.

        - LoRA-FA's frozen A, LoRA+'s learning rates and Delta-LoRA's rule are training details:
          the tensors are A and B.
        - With ``init="pissa"`` the layers hold the residual W_res = W - s B0 A0, but peft applies
          the adapter to the original W. Since W_res + s B A = W + s (B A - B0 A0), each layer is
          written as the exact rank-2r LoRA B' = [B, -B0], A' = [A; A0] with the same scale s
          (``lora_alpha`` doubled, or times sqrt(2) with rslora), as peft's own
          ``path_initial_model_for_weight_conversion`` does.
        - Layers of different ranks (after ``wb.reduce_rank``) get peft's ``rank_pattern`` and
          ``alpha_pattern``: each layer's rank, and the alpha that keeps its scale s
          (``alpha_for_rank``).
        """
        rslora = config.options.get("rslora", False)
        tensors: dict[str, dict[str, torch.Tensor]] = {}
        ranks = {}
        for name, layer in layers.items():
            a, b = layer.lora_A, layer.lora_B
            if layer.initial_update() is not None:  # PiSSA: W_res + s B A = W + s (B A - B0 A0)
                a, b = torch.cat([a, layer.lora_A0]), torch.cat([b, -layer.lora_B0], dim=1)
            tensors[name] = {"lora_A.weight": a, "lora_B.weight": b}
            ranks[name] = a.shape[0]
        rank = max(ranks.values())
        fields: dict[str, Any] = {
            "r": rank,
            "lora_alpha": alpha_for_rank(config.alpha, config.rank, rank, rslora),
            "lora_dropout": config.options.get("dropout", 0.0),
            "use_rslora": rslora,
            "init_lora_weights": True,
        }
        # peft matches pattern keys as r"(.*\.)?(key)$": the longest name first, so a layer never takes
        # the rank of another whose name ends its own.
        differing = sorted((name for name in ranks if ranks[name] != rank), key=len, reverse=True)
        if differing:
            fields["rank_pattern"] = {re.escape(name): ranks[name] for name in differing}
            fields["alpha_pattern"] = {
                re.escape(name): alpha_for_rank(config.alpha, config.rank, ranks[name], rslora) for name in differing
            }
        return PeftTensors(tensors), fields

    def from_peft(self, field: FieldReader) -> dict[str, Any]:
        """alpha, dropout and rslora from a peft LoRA's ``lora_alpha``, ``lora_dropout``, ``use_rslora``.

        A and B are then loaded as they are, whatever ``init_lora_weights`` says.
        """
        return {
            "alpha": field("lora_alpha", float),
            "dropout": field("lora_dropout", float, 0.0),
            "rslora": field("use_rslora", bool, False),
        }
