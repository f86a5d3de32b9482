"""Putting adapters on a model, folding them in, and taking them off again."""

from __future__ import annotations

import dataclasses
import operator
import sys
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .adapters import AdapterLayer, adapter_layers, get_variant, linear_shape
from .checks import is_finite_number
from .targets import Targets, find_targets, find_trained

_CONFIG = "_workbench_adapter_config"


@dataclass(frozen=True)
class AdapterConfig:
    """How a model was adapted: what ``add_adapters`` was given, with targets resolved.

    Attributes:
        variant: one of ``wb.VARIANTS``.
        rank: r; after ``wb.reduce_rank``, the largest layer rank.
        alpha: the scale numerator (None for vera, which has none). Every layer's scale is
            s = alpha / rank (alpha / sqrt(rank) with rslora) of this config, also after
            ``wb.reduce_rank``, which rescales alpha with the rank so that s stays the same.
        targets: the qualified names of the adapted layers, in module order.
        options: every option of the variant, defaults filled in.
        requires_grad: each parameter's ``requires_grad`` before adapting, restored on removal.
        layer_ranks: qualified name -> rank of every layer when ``wb.reduce_rank`` left the
            layers with different ranks; empty while every layer has ``rank``.
        train: the qualified names of the modules trained in full beside the adapters (``train=``
            resolved; peft's ``modules_to_save``), in module order; empty when there are none.
    """

    variant: str
    rank: int
    alpha: float | None
    targets: tuple[str, ...]
    options: dict[str, Any]
    requires_grad: dict[str, bool] = field(repr=False, default_factory=dict)
    layer_ranks: dict[str, int] = field(default_factory=dict)
    train: tuple[str, ...] = ()

    def ranks(self) -> dict[str, int]:
        """Every adapted layer's rank, by qualified name."""
        return {name: self.layer_ranks.get(name, self.rank) for name in self.targets}


def adapter_config(model: nn.Module) -> AdapterConfig:
    """The ``AdapterConfig`` of an adapted model.

    Raises:
        ValueError: the model has no adapters.
    """
    config = getattr(model, _CONFIG, None)
    if config is None:
        raise ValueError("the model has no adapters; add them with wb.add_adapters(model, variant, rank)")
    return config


def replace_config(model: nn.Module, **changes: Any) -> AdapterConfig:
    """Record that the adapters changed shape (``wb.reduce_rank``): the config with ``changes``, stored."""
    config = dataclasses.replace(adapter_config(model), **changes)
    setattr(model, _CONFIG, config)
    return config


# peft's classes for a model that carries its adapters, found only if peft is imported already
# (the model came from it): the library never imports peft.
_PEFT_CLASSES = (("peft.tuners.tuners_utils", "BaseTunerLayer"), ("peft.peft_model", "PeftModel"))


def _peft_module(model: nn.Module) -> str | None:
    """Which module of ``model`` is peft's (a ``PeftModel`` or a ``BaseTunerLayer``), in words; None if none is."""
    kinds = tuple(getattr(sys.modules.get(m), c) for m, c in _PEFT_CLASSES if hasattr(sys.modules.get(m), c))
    if not kinds:
        return None
    for name, module in model.named_modules():
        if isinstance(module, kinds):
            where = f"module {name!r}" if name else "the model"
            return f"{where} is a peft {type(module).__name__}"
    return None


def refuse_adapted(model: nn.Module) -> None:
    """Refuse what cannot be adapted: not an ``nn.Module``, or a model with adapters already.

    A model is adapted once; adapters from peft count too (adapting a ``PeftModel`` would wrap
    peft's own ``lora_A`` and ``lora_B`` layers).

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        ValueError: the model carries adapters, this library's or peft's.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch nn.Module, not a {type(model).__name__}")
    if getattr(model, _CONFIG, None) is not None or any(True for _ in adapter_layers(model)):
        raise ValueError("the model already has adapters; call wb.remove_adapters(model) before adding new ones")
    peft = _peft_module(model)
    if peft is not None:
        raise ValueError(
            f"the model carries peft adapters ({peft}), and a model is adapted once: fold them "
            "into the weights with peft's model.merge_and_unload() and adapt what it returns, or load a saved "
            "peft adapter onto the plain base model with wb.import_peft(base_model, directory)"
        )


def _check_rank(rank: object) -> int:
    """``rank`` as an int: any integer >= 1, including numpy's (``operator.index``), but not a bool.

    Raises:
        ValueError: a float, bool, string or an integer < 1.
    """
    try:
        value = operator.index(rank)
    except TypeError:
        value = None
    if value is None or isinstance(rank, bool) or value <= 0:
        raise ValueError(f"rank must be an integer >= 1, not {rank!r}")
    return value


def add_adapters(
    model: nn.Module,
    variant: str,
    rank: int,
    alpha: float | None = None,
    targets: Targets = None,
    *,
    train: Targets = None,
    **options: Any,
) -> nn.Module:
    """Wrap every targeted layer in an adapter of ``variant``, train ``train`` in full, freeze everything else.

    Each selected ``nn.Linear`` or ``Conv1D`` is replaced in place by the variant's adapter
    layer, which keeps the original module as ``base_layer`` and takes its train/eval mode (a
    model in eval mode gets adapters in eval mode, dropout off). Afterwards only the adapters'
    trainable tensors and every parameter of the ``train`` modules have ``requires_grad=True``
    (``wb.remove_adapters`` restores each parameter's flag as it was). At initialisation the
    outputs are unchanged: every variant's update starts at zero, or, with ``init="pissa"``
    (lora, lora-fa, delta-lora, lora-plus), A and B start as the top-r SVD of W and the frozen
    weight is the residual.

    Layers that cannot be adapted alone are skipped by ``targets=None`` and refused when named
    (see ``workbench.targets``): a tied layer, whose weight is shared with another module (GPT-2's
    ``lm_head`` and ``transformer.wte``), which merging would write too; and a shared layer, one
    module registered under two names, which an adapter would replace under one name only.

    Args:
        model: any ``nn.Module``, e.g. a transformers model built from a config.
        variant: one of ``wb.VARIANTS``.
        rank: r >= 1 (an int, or an integer such as numpy's); for the LoRA family at most
            min(in, out) of every targeted layer.
        alpha: the scale numerator of alpha / r, a finite number > 0; ``None`` means alpha = r
            (scale 1). Not used by vera.
        targets: see ``find_targets``: exact names, suffixes such as ``"q_proj"``, or regular
            expressions; ``None`` means every supported linear layer that is neither tied nor shared,
            nor part of a ``train`` module.
        train: modules to train in full beside the adapters, as peft's ``modules_to_save``: a new
            classification head, say (``train=["classifier"]``). Patterns as for ``targets`` (exact
            qualified names, suffixes, regular expressions), matched against modules of any type
            that have parameters; a module inside another selected one is part of it. Every
            parameter of them trains (``wb.make_optimizer`` gives them ``lr``), checkpoints hold
            them and ``wb.export_peft`` writes them as peft's ``modules_to_save``. Refused: a
            pattern matching no module (the message lists the module names); a module that is
            adapted too, or contains or is inside an adapted layer (the message names both); and a
            module whose parameter is tied to a module outside ``train`` (GPT-2's ``lm_head``, whose
            weight is ``transformer.wte.weight``), which would train that module too: name both
            (``train=["lm_head", "transformer.wte"]``) to train the shared weight for both, or
            untie it first. Recorded, resolved to qualified names, as ``AdapterConfig.train``.
        **options: the variant's own options, e.g. ``dropout=0.1`` for lora, ``init="pissa"``.

    Returns:
        The same model, adapted.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``, or ``targets`` or ``train`` is not None, a
            string or a list of strings.
        ValueError: unknown variant or option, invalid rank, alpha or option value (NaN and
            infinities included), targets that match nothing or select a tied or shared layer,
            ``train`` refused as above, or a model that already has adapters (this library's or
            peft's). The model is then unchanged.
    """
    refuse_adapted(model)
    spec = get_variant(variant)
    rank = _check_rank(rank)
    if not spec.uses_alpha:
        if alpha is not None:
            raise ValueError(f"variant {variant!r} has no alpha scaling; leave alpha=None")
    elif alpha is None:
        alpha = float(rank)
    elif not is_finite_number(alpha) or alpha <= 0:
        raise ValueError(f"alpha must be a finite number > 0 (or None for alpha = rank), not {alpha!r}")
    resolved = spec.resolve_options(options)
    trained = find_trained(model, train)
    bases = find_targets(model, targets, train)
    if spec.rank_limited:
        for name, base in bases.items():
            limit = min(linear_shape(base))
            if rank > limit:
                raise ValueError(
                    f"rank {rank} is larger than layer {name!r} allows: at most min(in, out) = {limit}"
                )
    layers = spec.build(bases, rank, alpha, resolved)

    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    model.requires_grad_(False)
    for name, layer in layers.items():
        layer.train(bases[name].training)
        _replace(model, name, layer)
        for param in layer.adapter_params().values():
            param.requires_grad_(True)
    for module in trained.values():
        module.requires_grad_(True)
    config = AdapterConfig(variant, rank, alpha, tuple(layers), resolved, requires_grad, train=tuple(trained))
    setattr(model, _CONFIG, config)
    return model


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    parent.register_module(child, module)


def _layers(model: nn.Module) -> list[tuple[str, AdapterLayer]]:
    adapter_config(model)
    return list(adapter_layers(model))


def merge_adapters(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight, W <- W + delta W, for inference without overhead.

    The adapters stay in place (``unmerge_adapters`` takes the update out again); merging twice
    does nothing. Returns the model.
    """
    for _, layer in _layers(model):
        layer.merge()
    return model


def unmerge_adapters(model: nn.Module) -> nn.Module:
    """Take every merged update out of its base weight again, W <- W - delta W.

    delta W is what merging added (each layer keeps it while merged), not a recomputation, so an
    update that depends on W comes out exactly too. Returns the model.
    """
    for _, layer in _layers(model):
        layer.unmerge()
    return model


def remove_adapters(model: nn.Module, merge: bool = False) -> nn.Module:
    """Put the original modules back and restore every parameter's ``requires_grad``.

    Args:
        merge: fold each update into its base weight first (keep what was learnt), instead of
            discarding it. Delta-LoRA's moved weights stay moved either way: they are the base.
            Without merging, a PiSSA layer gives back the original W = W_res + s B0 A0 (within
            float rounding), not the residual it trained on; with merging, W_res + s B A.

    Returns:
        The model, with no adapter left.
    """
    config = adapter_config(model)
    for name, layer in _layers(model):
        if merge:
            layer.merge()
        else:
            layer.unmerge()
            layer.restore_base_weight()
        _replace(model, name, layer.base_layer)
    for name, param in model.named_parameters():
        param.requires_grad_(config.requires_grad.get(name, param.requires_grad))
    delattr(model, _CONFIG)
    return model


def trainable_parameters(model: nn.Module) -> int:
    """The number of scalars with ``requires_grad=True``, each shared tensor counted once."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
