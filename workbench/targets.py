"""Which modules of a model get adapters: resolving ``targets`` to qualified module names.

Two kinds of supported layer cannot be adapted on their own, because writing W (merging,
PiSSA's residual, Delta-LoRA's moves) or replacing the module would reach past the layer:

- a tied layer, whose weight Parameter is also reachable under another name (GPT-2's
  ``lm_head.weight`` is ``transformer.wte.weight``; any model with ``tie_word_embeddings``;
  two torch modules given one Parameter): merging would write the embedding too;
- a shared layer, one module object registered at two or more paths (``model.a = model.b``):
  an adapter would replace it under one name and leave the other path unadapted.

``targets=None`` skips both; a pattern that selects one is refused, with the reason.
"""

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


def target_patterns(targets: Targets) -> list[str] | None:
    """``targets`` checked and as a list of patterns (None stays None), for any caller that takes targets.

    Raises:
        TypeError: targets is not None, a string, or a list or tuple of strings.
        ValueError: an empty string or an empty list.
    """
    if targets is None:
        return None
    expects = "None, a non-empty string or a non-empty list of them"
    if isinstance(targets, str):
        patterns = [targets]
    elif isinstance(targets, Sequence):
        patterns = list(targets)
    else:
        raise TypeError(f"targets must be {expects}, not {targets!r} of type {type(targets).__name__}")
    wrong = [p for p in patterns if not isinstance(p, str)]
    if wrong:
        raise TypeError(f"targets must be {expects}; {wrong[0]!r} in {targets!r} is not a string")
    if not patterns or not all(patterns):
        raise ValueError(f"targets must be {expects}, not {targets!r}")
    return patterns


def _unadaptable_layers(model: nn.Module, supported: dict[str, nn.Module]) -> dict[str, str]:
    """The layers of ``supported`` (every path) that cannot be adapted alone, by name: why, in words.

    A layer is shared when ``named_modules(remove_duplicate=False)`` reaches its module object
    under more than one path, and tied when ``named_parameters(remove_duplicate=False)`` reaches
    its weight Parameter under a name other than ``<layer>.weight``. Ties are found by the
    Parameter's identity, whatever the model's config says.
    """
    paths: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        paths.setdefault(id(module), []).append(name)
    parameter_names: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        parameter_names.setdefault(id(param), []).append(name)

    reasons = {}
    for name, module in supported.items():
        kind = type(module).__name__
        if len(paths[id(module)]) > 1:
            listed = " and ".join(repr(path) for path in paths[id(module)])
            reasons[name] = (
                f"the same {kind} is registered as {listed}; an adapter would replace it under one name only, "
                "leaving the other unadapted. Give each name its own copy (copy.deepcopy) or leave it out of "
                "targets (targets=None skips shared layers)"
            )
            continue
        others = [other for other in parameter_names.get(id(module.weight), []) if other != f"{name}.weight"]
        if others:
            reasons[name] = (
                f"{name}.weight is tied to {', '.join(others)}; an adapter on {name!r} would write its merge "
                f"(and PiSSA's residual, Delta-LoRA's moves) into {others[0]} too. Leave {name!r} out of targets "
                f"(targets=None skips tied layers) or untie it first, giving {name!r} a weight of its own "
                "(a clone of the tied one as a new nn.Parameter)"
            )
    return reasons


def find_targets(model: nn.Module, targets: Targets = None) -> dict[str, nn.Module]:
    """The supported layers that ``targets`` selects, by qualified name, in module order.

    Args:
        model: any ``nn.Module``.
        targets: a pattern or a list of patterns, each an exact qualified name, a name suffix or
            a regular expression matched against the whole name; ``None`` selects every
            supported layer (``nn.Linear`` and transformers' ``Conv1D``) except tied and shared
            ones (see the module docstring), which it skips.

    Raises:
        TypeError: targets is not None, a string or a list of strings.
        ValueError: an empty pattern or list; the model has no supported layer (or only tied
            and shared ones); a pattern selects none (the message names the pattern and the
            layer names that would match); or a pattern selects a tied or shared layer (the
            message names the tie or both paths, and what to do instead).
    """
    patterns = target_patterns(targets)
    # every path, so that each name of a shared layer is matched (and refused)
    supported = {
        name: module for name, module in model.named_modules(remove_duplicate=False) if name and is_supported(module)
    }
    if not supported:
        raise ValueError("the model has no layer an adapter can wrap (nn.Linear or transformers Conv1D)")
    unadaptable = _unadaptable_layers(model, supported)
    if patterns is None:
        chosen = {name: module for name, module in supported.items() if name not in unadaptable}
        if not chosen:
            raise ValueError(f"no layer of the model can be adapted alone: {next(iter(unadaptable.values()))}")
        return chosen
    hits: set[str] = set()
    for pattern in patterns:
        matched = {name for name in supported if _matches(pattern, name)}
        if not matched:
            raise ValueError(_no_match_message(model, pattern, supported))
        hits |= matched
    refused = [name for name in supported if name in hits and name in unadaptable]
    if refused:
        raise ValueError(f"cannot adapt {refused[0]!r}: {unadaptable[refused[0]]}")
    return {name: module for name, module in supported.items() if name in hits}


def _no_match_message(model: nn.Module, pattern: str, supported: dict[str, nn.Module]) -> str:
    unsupported = [(n, m) for n, m in model.named_modules(remove_duplicate=False) if n and _matches(pattern, n)]
    if unsupported:
        name, module = unsupported[0]
        return (
            f"target {pattern!r} matches {name!r}, a {type(module).__name__}, which is not a supported "
            "layer (nn.Linear or transformers Conv1D)"
        )
    suffixes = sorted({name.rsplit(".", 1)[-1] for name in supported})
    return f"target {pattern!r} matches no layer of the model; adaptable layer names end in: {', '.join(suffixes)}"
