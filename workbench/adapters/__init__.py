"""Adapter layers, one file per variant, and the registry that maps names to them."""

# Importing a variant's file registers it; this order is the order of VARIANTS.
from . import lora, lora_fa, vera, delta_lora, lora_plus, dora  # noqa: F401, I001
from .dora import DoRALinear
from .layer import AdapterLayer, adapter_layers, is_conv1d, is_supported, linear_shape, linear_weight
from .lora import LoRALinear, alpha_for_rank, lora_scaling, svd_factors
from .lora_fa import LoRAFALinear
from .variant import (
    Option,
    PeftTensors,
    Variant,
    get_variant,
    register,
    temporary_variant,
    unregister,
    variant_names,
    variant_options,
)
from .vera import VeRALinear, vera_projections


def __getattr__(name: str) -> object:
    """``VARIANTS``: the names registered now (``variant_names()``), so a variant registered later is in it."""
    if name == "VARIANTS":
        return variant_names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "VARIANTS",
    "AdapterLayer",
    "DoRALinear",
    "LoRAFALinear",
    "LoRALinear",
    "Option",
    "PeftTensors",
    "VeRALinear",
    "Variant",
    "adapter_layers",
    "alpha_for_rank",
    "get_variant",
    "is_conv1d",
    "is_supported",
    "linear_shape",
    "linear_weight",
    "lora_scaling",
    "register",
    "svd_factors",
    "temporary_variant",
    "unregister",
    "variant_names",
    "variant_options",
    "vera_projections",
]
