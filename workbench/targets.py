"""Which modules of a model get adapters: resolving ``targets`` to qualified module names."""

from __future__ import annotations

import re
from collections.abc import Sequence

from torch import nn

from .adapters import is_supported

Targets = str | Sequence[str] | None


def _matches(pattern: str, name: str) -> bool:
    """Exact name, name suffix at a dot (``"q_proj"`` matches ``"layers.0.attn.q_proj"``), or regex."""
    if name == pattern or name.endswith("." + pattern):
        return True
    try:
        return re.fullmatch(pattern, name) is not None
    except re.error:
        return False


def find_targets(model: nn.Module, targets: Targets = None) -> dict[str, nn.Module]:
    """The supported layers that ``targets`` selects, by qualified name, in module order.

    Args:
        model: any ``nn.Module``.
        targets: a pattern or a list of patterns, each an exact qualified name, a name suffix or
            a regular expression matched against the whole name; ``None`` selects every
            supported layer (``nn.Linear`` and transformers' ``Conv1D``).

    Raises:
        ValueError: the model has no supported layer, or a pattern selects none; the message
            names the pattern and the layer names that would match.
    """
    supported = {name: module for name, module in model.named_modules() if name and is_supported(module)}
    if not supported:
        raise ValueError("the model has no layer an adapter can wrap (nn.Linear or transformers Conv1D)")
    if targets is None:
        return supported
    patterns = [targets] if isinstance(targets, str) else list(targets)
    if not patterns or not all(isinstance(p, str) and p for p in patterns):
        raise ValueError(f"targets must be None, a non-empty string or a non-empty list of them, not {targets!r}")
    chosen: set[str] = set()
    for pattern in patterns:
        hits = {name for name in supported if _matches(pattern, name)}
        if not hits:
            raise ValueError(_no_match_message(model, pattern, supported))
        chosen |= hits
    return {name: module for name, module in supported.items() if name in chosen}


def _no_match_message(model: nn.Module, pattern: str, supported: dict[str, nn.Module]) -> str:
    unsupported = [(n, m) for n, m in model.named_modules() if n and _matches(pattern, n)]
    if unsupported:
        name, module = unsupported[0]
        return (
            f"target {pattern!r} matches {name!r}, a {type(module).__name__}, which is not a supported "
            "layer (nn.Linear or transformers Conv1D)"
        )
    suffixes = sorted({name.rsplit(".", 1)[-1] for name in supported})
    return f"target {pattern!r} matches no layer of the model; adaptable layer names end in: {', '.join(suffixes)}"
