"""Delta-LoRA: LoRA that also moves the frozen weight (Zi et al., 2023, https://arxiv.org/abs/2309.02411)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .layer import AdapterLayer
from .lora import LoRA
from .variant import count_option, init_option, number_option, register


@register
class DeltaLoRA(LoRA):
    """``"delta-lora"``: the LoRA layer without dropout, plus a rule after each optimizer step.

    After step t (counted from 1) with t > ``delta_start``, every adapted weight moves by the
    change of its low-rank product::

        W <- W + lambda * (alpha / r) * (B' A' - B A)

    where B A and B' A' are the products before and after the step, so W follows the
    adapter's trajectory at no cost in trainable parameters; the first ``delta_start`` steps
    are plain LoRA. W keeps ``requires_grad=False`` and gets no gradient.

    The step count lives in the optimizer's parameter group (``delta_steps``), with
    ``delta_lambda`` and ``delta_start``, so saving and loading the optimizer state keeps it.
    Options: ``rslora`` (default False), ``delta_lambda`` (default 0.5), ``delta_start``
    (default 0; the paper starts after a warm-up of plain LoRA steps), ``init`` ("default" or
    "pissa", as for ``"lora"``; with PiSSA the weight that moves is the residual W - s B0 A0).
    """

    name = "delta-lora"
    moves_base_weights = True
    options = {
        "rslora": LoRA.options["rslora"],
        "delta_lambda": number_option(
            0.5, "lambda: how far W follows each step's change of the adapter, W += lambda (alpha / r) (B'A' - BA)"
        ),
        "delta_start": count_option(0, "plain LoRA steps before W starts to move"),
        "init": init_option(),
    }

    def param_groups(
        self, layers: Sequence[AdapterLayer], lr: float, options: Mapping[str, Any]
    ) -> list[dict[str, Any]]:
        (group,) = super().param_groups(layers, lr, options)
        group.update(delta_lambda=options["delta_lambda"], delta_start=options["delta_start"], delta_steps=0)
        return [group]

    def attach(self, optimizer: torch.optim.Optimizer, layers: Sequence[AdapterLayer]) -> None:
        """Register the weight update as step hooks on ``optimizer``."""
        (group,) = [g for g in optimizer.param_groups if "delta_lambda" in g]
        before: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

        def remember_products(*_: Any) -> None:
            if group["delta_steps"] + 1 > group["delta_start"]:
                for index, layer in enumerate(layers):
                    before[index] = (layer.lora_B.detach().clone(), layer.lora_A.detach().clone())

        @torch.no_grad()
        def move_weights(*_: Any) -> None:
            group["delta_steps"] += 1
            if group["delta_steps"] <= group["delta_start"]:
                return
            for index, layer in enumerate(layers):
                old_b, old_a = before.pop(index)
                change = layer.lora_B @ layer.lora_A - old_b @ old_a  # (out, in)
                weight = layer.base_weight()
                weight.add_(change.to(weight.dtype), alpha=group["delta_lambda"] * layer.scaling)

        optimizer.register_step_pre_hook(remember_products)
        optimizer.register_step_post_hook(move_weights)
