"""Adapter layers, one file per variant, and the registry that maps names to them."""

# Importing a variant's file registers it; this order is the order of VARIANTS.
from . import lora, lora_fa, vera, delta_lora, lora_plus  # noqa: F401, I001
from .layer import AdapterLayer, adapter_layers, is_supported, linear_shape
from .lora import LoRALinear, svd_factors
from .lora_fa import LoRAFALinear
from .variant import Variant, get_variant, registered
from .vera import VeRALinear, vera_projections

VARIANTS: tuple[str, ...] = registered()

__all__ = [
    "VARIANTS",
    "AdapterLayer",
    "LoRAFALinear",
    "LoRALinear",
    "VeRALinear",
    "Variant",
    "adapter_layers",
    "get_variant",
    "is_supported",
    "linear_shape",
    "svd_factors",
    "vera_projections",
]
