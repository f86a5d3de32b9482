"""Which modules of a model get adapters: resolving ``targets`` to qualified module names.

Two kinds of supported layer cannot be adapted on their own, because writing W (merging,
PiSSA's residual, Delta-LoRA's moves) or replacing the module would reach past the layer:

- a tied layer, whose weight Parameter is also reachable under another name (GPT-2's
  ``lm_head.weight`` is ``transformer.wte.weight``; any model with ``tie_word_embeddings``;
  two torch modules given one Parameter): merging would write the embedding too;
- a shared layer, one module object registered at two or more paths (``model.a = model.b``):
  an adapter would replace it under one name and leave the other path unadapted.

``targets=None`` skips both; a pattern that selects one is refused, with the reason.

Modules trained in full next to the adapters (``train``, peft's ``modules_to_save``) are resolved
by the same patterns (``find_trained``). A module is adapted or trained in full, never both: a
layer that is, is inside or contains a trained module is skipped by ``targets=None`` and refused
when named.
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


def target_patterns(targets: Targets, what: str = "targets") -> list[str] | None:
    """``targets`` checked and as a list of patterns (None stays None), for any caller that takes targets.

    Args:
        what: the argument's name in the messages (``"train"`` for ``find_trained``).

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
        raise TypeError(f"{what} must be {expects}, not {targets!r} of type {type(targets).__name__}")
    wrong = [p for p in patterns if not isinstance(p, str)]
    if wrong:
        raise TypeError(f"{what} must be {expects}; {wrong[0]!r} in {targets!r} is not a string")
    if not patterns or not all(patterns):
        raise ValueError(f"{what} must be {expects}, not {targets!r}")
    return patterns


def _within(name: str, outer: str) -> bool:
    """Whether the module called ``name`` is the one called ``outer`` or inside it."""
    return name == outer or name.startswith(outer + ".")


def find_trained(model: nn.Module, train: Targets = None) -> dict[str, nn.Module]:
    """The modules ``train`` selects to train in full, by qualified name, in module order.

    Each pattern is matched as a target is (exact qualified name, name suffix at a dot, or a
    regular expression matched against the whole name), against every module of any type that
    has parameters. A selected module inside another selected one is part of it: only the
    outermost are returned. Examples: ``"classifier"`` (a head), ``"bert.pooler"``, ``"layer.11"`` (a block).

    A trained module's parameters must be its own: one also reachable under a name outside every
    trained module (a weight tied to another module's, as GPT-2's ``lm_head.weight`` is
    ``transformer.wte.weight``, or a module registered under two names) would train that other
    module too, and is refused; naming both modules (``train=["lm_head", "transformer.wte"]``)
    trains the shared weight for both, as asked.

    Args:
        train: a pattern or a list of patterns; None or an empty list selects nothing.

    Raises:
        TypeError: train is not None, a string or a list of strings.
        ValueError: an empty pattern; a pattern that matches no module (naming it and the
            module names), or only modules without parameters; a trained parameter reachable
            from outside the trained modules (naming both names and what to do instead).
    """
    if train is None or (isinstance(train, (list, tuple)) and not train):
        return {}
    patterns = target_patterns(train, "train")
    modules = [(name, module) for name, module in model.named_modules(remove_duplicate=False) if name]
    hits: set[str] = set()
    for pattern in patterns:
        matched = [(name, module) for name, module in modules if _matches(pattern, name)]
        if not matched:
            suffixes = ", ".join(sorted({name.rsplit(".", 1)[-1] for name, _ in modules}))
            children = ", ".join(name for name, _ in model.named_children())
            raise ValueError(f"train pattern {pattern!r} matches no module of the model; module names end in: "
                             f"{suffixes} (the top-level modules: {children})")
        with_parameters = {name for name, module in matched if any(True for _ in module.parameters())}
        if not with_parameters:
            name, module = matched[0]
            raise ValueError(f"train pattern {pattern!r} selects only modules without parameters ({name!r}, a "
                             f"{type(module).__name__}): there is nothing to train in them")
        hits |= with_parameters
    chosen = {name: module for name, module in modules
              if name in hits and not any(_within(name, outer) and name != outer for outer in hits)}
    trained_parameters = {id(param): (outer, own) for outer, module in chosen.items()
                          for own, param in module.named_parameters(remove_duplicate=False)}
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in trained_parameters and not any(_within(name, outer) for outer in chosen):
            trained, own = trained_parameters[id(param)]
            outside = name.rpartition(".")[0]
            raise ValueError(
                f"cannot train {trained!r} in full: its parameter {trained}.{own} is also {name} (a tied weight, or "
                f"a module registered under two names), outside train, so training {trained!r} would train "
                f"{outside!r} too. Add {outside!r} to train to train the shared weight for both, or untie it first, "
                f"giving {trained!r} a weight of its own (a clone of the tied one as a new nn.Parameter)"
            )
    return chosen


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


def find_targets(model: nn.Module, targets: Targets = None, train: Targets = None) -> dict[str, nn.Module]:
    """The supported layers that ``targets`` selects, by qualified name, in module order.

    Args:
        model: any ``nn.Module``.
        targets: a pattern or a list of patterns, each an exact qualified name, a name suffix or
            a regular expression matched against the whole name; ``None`` selects every
            supported layer (``nn.Linear`` and transformers' ``Conv1D``) except tied and shared
            ones (see the module docstring), which it skips.
        train: the modules trained in full beside the adapters (``find_trained``); ``None``
            skips the layers that are, are inside or contain one of them, e.g. the classifier of
            ``train=["classifier"]``, and naming such a layer in ``targets`` is refused.

    Raises:
        TypeError: targets or train is not None, a string or a list of strings.
        ValueError: an empty pattern or list; the model has no supported layer (or only tied
            and shared ones); a pattern selects none (the message names the pattern and the
            layer names that would match); a pattern selects a tied or shared layer (the
            message names the tie or both paths, and what to do instead) or one of a trained
            module (naming both); or ``find_trained`` refuses ``train``.
    """
    patterns = target_patterns(targets)
    trained = find_trained(model, train)
    # every path, so that each name of a shared layer is matched (and refused)
    supported = {
        name: module for name, module in model.named_modules(remove_duplicate=False) if name and is_supported(module)
    }
    if not supported:
        raise ValueError("the model has no layer an adapter can wrap (nn.Linear or transformers Conv1D)")
    unadaptable = _unadaptable_layers(model, supported)
    for name in supported:
        overlap = _trained_overlap(name, trained)
        if overlap is not None:
            unadaptable.setdefault(name, overlap)
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


def _trained_overlap(name: str, trained: dict[str, nn.Module]) -> str | None:
    """Why layer ``name`` cannot be adapted when ``trained`` modules train in full, or None if it can."""
    for outer in trained:
        if name == outer:
            where = f"train selects {name!r} to train in full"
        elif _within(name, outer):
            where = f"it is inside {outer!r}, which train selects to train in full (its weight with the rest)"
        elif _within(outer, name):
            where = f"it contains {outer!r}, which train selects to train in full"
        else:
            continue
        return (f"{where}, and a module is adapted or trained in full, not both. Leave {name!r} out of targets "
                f"(targets=None skips the layers of trained modules) or {outer!r} out of train")
    return None


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
