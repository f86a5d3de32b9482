"""A variant is everything specific to one adapter method; the registry maps names to variants.

A new variant is one new file: a ``Variant`` subclass registered with ``@register``, naming its
options (each with help text, from which the CLI flags and the panel controls are generated),
building its layers and, where it has them, its optimisation rule and its PEFT mapping. In the
package, one import line in ``adapters/__init__.py`` registers it; from a user's own file, importing
that file does, before the CLI parser or a panel is built::

    @register
    class LoRAPlus(LoRA):  # adapters/lora_plus.py: the layer, PEFT mapping and reducibility are LoRA's
        name = "lora-plus"
        options = {**LoRA.options, "lr_ratio": positive_option(16.0, "B's learning rate over A's")}

        def param_groups(self, layers, lr, options):
            return [{"params": [l.lora_A for l in layers], "lr": lr},
                    {"params": [l.lora_B for l in layers], "lr": lr * options["lr_ratio"]}]
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from ..checks import is_finite_number, is_integer, is_number
from .layer import AdapterLayer

if TYPE_CHECKING:
    from ..adapt import AdapterConfig

OPTION_KINDS: tuple[type, ...] = (bool, int, float, str)


@dataclass(frozen=True)
class Option:
    """One option of a variant: its default, which values are valid, and what it does.

    The option's kind is the type of its default (bool, int, float or str): the CLI flag and
    the panel control of the option are made from it (a bool is a flag, a str with ``choices``
    a list to pick from), so a float option needs a float default (``1.0``, not ``1``).

    Args:
        default: the value used when the option is not given.
        valid: says whether a value is acceptable.
        expects: the valid values in words, for the error message, e.g. ``"a float in [0, 1)"``.
        help: what the option does, in a line: the CLI's ``--help`` and the panel's tooltip.
        choices: the valid values of a str option, offered as a list; None for a free value.

    Example::

        Option(0.0, lambda p: 0 <= p < 1, "a float in [0, 1)", "dropout probability on the adapter's input")
        choice_option("default", ("default", "pissa"), "how A and B start")

    Raises:
        TypeError: a default of another kind, or choices for an option that is not a str.
        ValueError: a default that ``valid`` refuses or that is not among ``choices``.
    """

    default: Any
    valid: Callable[[Any], bool] = field(repr=False)
    expects: str
    help: str = ""
    choices: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.choices is not None:
            object.__setattr__(self, "choices", tuple(self.choices))  # frozen: compared and shown as a tuple
        if type(self.default) not in OPTION_KINDS:
            raise TypeError(f"an option's default must be a bool, int, float or str, not {self.default!r}")
        if self.choices is not None:
            if self.kind is not str:
                raise TypeError(f"choices are for str options, not for one whose default is {self.default!r}")
            if self.default not in self.choices:
                raise ValueError(f"the default {self.default!r} is not among the choices {self.choices}")
        if not self.valid(self.default):
            raise ValueError(f"the default {self.default!r} is invalid: expected {self.expects}")

    @property
    def kind(self) -> type:
        """bool, int, float or str: the type of the default."""
        return type(self.default)


def dropout_option(help: str = "dropout probability on the adapter path's input, in training only; "
                   "the base path has none") -> Option:
    return Option(0.0, lambda p: is_number(p) and 0 <= p < 1, "a float in [0, 1)", help)


def flag_option(default: bool, help: str) -> Option:
    return Option(default, lambda v: isinstance(v, bool), "True or False", help)


def number_option(default: float, help: str) -> Option:
    """Any finite number: NaN or an infinity would make every output NaN or infinite."""
    return Option(default, is_finite_number, "a finite number", help)


def positive_option(default: float, help: str) -> Option:
    return Option(default, lambda v: is_finite_number(v) and v > 0, "a finite number > 0", help)


def count_option(default: int, help: str) -> Option:
    return Option(
        default, lambda v: is_integer(v) and v >= 0, "an integer >= 0", help
    )


def choice_option(default: str, choices: Sequence[str], help: str) -> Option:
    """One of ``choices``; the error message lists them."""
    choices = tuple(choices)
    return Option(default, lambda v: v in choices, " or ".join(repr(c) for c in choices), help, choices)


INITS: tuple[str, ...] = ("default", "pissa")


def init_option() -> Option:
    """How A and B start: ``"default"`` (B A = 0) or ``"pissa"`` (the top-r SVD of W; see ``LoRALinear``)."""
    return choice_option("default", INITS, "how A and B start: 'default' (A random, B zero, so B A = 0) or "
                         "'pissa' (the top-r singular vectors of W, with the residual frozen)")


@dataclass
class PeftTensors:
    """An adapter's tensors as peft names them, without the file's key prefixes.

    Attributes:
        layers: adapted module name -> tensor name -> tensor, e.g. ``{"0": {"lora_A.weight": A}}``,
            saved as ``base_model.model.0.lora_A.weight``.
        shared: tensors of the whole model, e.g. ``{"vera_A": A}``, saved as ``base_model.vera_A``.
    """

    layers: dict[str, dict[str, torch.Tensor]]
    shared: dict[str, torch.Tensor] = field(default_factory=dict)


# Reads one field of adapter_config.json: field(key, kind) (required) or field(key, kind, default),
# kind int, float or bool; raises ValueError naming the field when it is missing or of another kind.
FieldReader = Callable[..., Any]


class Variant(ABC):
    """The behaviour of one adapter method, as used by ``add_adapters``, ``make_optimizer``, the PEFT
    format and rank reduction; code elsewhere asks the variant, never tests its name.

    Class attributes:
        name: the name users pass, e.g. ``"lora"``.
        options: the variant's keyword options: defaults, valid values and help (``Option``).
        uses_alpha: whether the update is scaled by alpha / r (VeRA has no alpha).
        rank_limited: whether r must be at most min(in, out) of each layer.
        reducible: whether ``wb.reduce_rank`` can truncate each layer's update on its own: the
            update is s B A with per-layer factors, and the layer has ``lora_A``, ``lora_B``,
            ``scaling`` and ``set_factors`` (as ``LoRALinear``).
        low_rank_update: whether ``delta_weight()`` has rank at most r, so that its singular values
            are the update's spectrum (``wb.spectrum``); DoRA's rescales the rows of W, so it is not.
        moves_base_weights: whether training changes the adapted layers' base weights, so a
            checkpoint of what training changes must hold them, and a PEFT export (which holds
            only the adapter) must be loaded on the moved weights.
        peft_type: the PEFT adapter type it exports as (``"LORA"``, ``"VERA"``), or None if it has
            none. A PEFT adapter of a type imports as the first registered variant of that type
            whose ``peft_fields`` it has, those with more fields first.
        peft_fields: config fields, with their values, that mark the variant among those of its
            ``peft_type``, e.g. DoRA's ``{"use_dora": True}``; written on export, matched on import.
        peft_tensors: the names of each layer's tensors in peft's file, e.g. ``"lora_A.weight"``.
        peft_shared: the names of the model-wide tensors peft may save, e.g. ``"vera_A"``.
    """

    name: ClassVar[str]
    options: ClassVar[Mapping[str, Option]]
    uses_alpha: ClassVar[bool] = True
    rank_limited: ClassVar[bool] = True
    reducible: ClassVar[bool] = False
    low_rank_update: ClassVar[bool] = True
    moves_base_weights: ClassVar[bool] = False
    peft_type: ClassVar[str | None] = None
    peft_fields: ClassVar[Mapping[str, Any]] = {}
    peft_tensors: ClassVar[tuple[str, ...]] = ()
    peft_shared: ClassVar[tuple[str, ...]] = ()

    def resolve_options(self, given: Mapping[str, Any]) -> dict[str, Any]:
        """The full option dict: ``given`` checked against ``options``, defaults filled in.

        Raises:
            ValueError: an unknown option or an invalid value; the message lists the valid ones.
        """
        unknown = sorted(set(given) - set(self.options))
        if unknown:
            valid = ", ".join(self.options) or "none"
            raise ValueError(f"unknown option {unknown[0]!r} for variant {self.name!r}; valid options: {valid}")
        for key, value in given.items():
            option = self.options[key]
            if not option.valid(value):
                raise ValueError(
                    f"option {key}={value!r} of variant {self.name!r} is invalid: expected {option.expects}"
                )
        return {key: given.get(key, option.default) for key, option in self.options.items()}

    @abstractmethod
    def build(
        self, bases: Mapping[str, nn.Module], rank: int, alpha: float, options: Mapping[str, Any]
    ) -> dict[str, AdapterLayer]:
        """Adapter layers wrapping each base layer (by qualified name).

        The model's modules are not replaced here; an init that rewrites the base weight (PiSSA's
        residual) does so in place, and the layer gives the weight back on removal.
        """

    def param_groups(
        self, layers: Sequence[AdapterLayer], lr: float, options: Mapping[str, Any]
    ) -> list[dict[str, Any]]:
        """Optimizer parameter groups for the adapters; by default one group at ``lr``."""
        return [{"params": [p for layer in layers for p in layer.adapter_params().values()], "lr": lr}]

    def attach(self, optimizer: torch.optim.Optimizer, layers: Sequence[AdapterLayer]) -> None:  # noqa: B027
        """Add the variant's rule to ``optimizer`` (step hooks); by default there is none."""

    def to_peft(
        self, layers: Mapping[str, AdapterLayer], config: AdapterConfig
    ) -> tuple[PeftTensors, dict[str, Any]]:
        """The adapter as peft saves one of ``peft_type``: its tensors, and its own config fields.

        The fields are those of the type (``r``, ``lora_alpha``, ...); the ones every type shares
        (``peft_type``, ``target_modules``, ``fan_in_fan_out``, ...) are the format's.

        Raises:
            ValueError: the variant has no PEFT equivalent (``peft_type`` is None).
        """
        exportable = [name for name in variant_names() if get_variant(name).peft_type is not None]
        raise ValueError(f"variant {self.name!r} has no PEFT equivalent; variants that export: {', '.join(exportable)}")

    def from_peft(self, field: FieldReader) -> dict[str, Any]:
        """The ``add_adapters`` arguments (``alpha`` if it has one, and options) of a peft adapter of ``peft_type``.

        Args:
            field: reads one field of the adapter's config, its kind checked:
                ``field("lora_alpha", float)`` (required) or ``field("lora_dropout", float, 0.0)``.
        """
        raise ValueError(f"variant {self.name!r} does not import peft adapters")

    @torch.no_grad()
    def load_peft(self, layers: Mapping[str, AdapterLayer], tensors: PeftTensors) -> None:
        """Copy peft's tensors into freshly built ``layers``.

        Each tensor goes to the layer attribute it names, as the layers use peft's names
        (``lora_A.weight`` -> ``lora_A``, ``vera_lambda_b`` -> ``vera_lambda_b``); a shared one to
        the first layer's, which every layer shares (``vera_A``).

        Raises:
            ValueError: a layer's tensor is missing, or a tensor's shape is not the layer's.
        """
        for name, layer in layers.items():
            given = tensors.layers.get(name, {})
            for key in self.peft_tensors:
                if key not in given:
                    raise ValueError(f"the adapter file lacks {key!r} of module {name!r}")
                _copy_into(getattr(layer, key.removesuffix(".weight")), given[key], f"{key} of {name!r}",
                           f"the model's {name!r}")
        first = next(iter(layers.values()))
        for key, value in tensors.shared.items():
            _copy_into(getattr(first, key.removesuffix(".weight")), value, key, "this model")


def _copy_into(target: torch.Tensor, value: torch.Tensor, what: str, whose: str) -> None:
    if target.shape != value.shape:
        raise ValueError(f"{what} has shape {tuple(value.shape)} but {whose} needs {tuple(target.shape)}")
    target.copy_(value)


_REGISTRY: dict[str, Variant] = {}


def register(cls: type[Variant]) -> type[Variant]:
    """Class decorator: make the variant available under ``cls.name`` (a name registered again is replaced).

    Raises:
        TypeError: an option of the variant has the name of another variant's option of another
            kind (an option name is one CLI flag and one panel control, so it has one kind).
    """
    for key, option in cls.options.items():
        for other in _REGISTRY.values():
            theirs = other.options.get(key)
            if other.name != cls.name and theirs is not None and theirs.kind is not option.kind:
                raise TypeError(
                    f"option {key!r} of variant {cls.name!r} is a {option.kind.__name__}, but variant "
                    f"{other.name!r} has it as a {theirs.kind.__name__}: give the option another name"
                )
    _REGISTRY[cls.name] = cls()
    return cls


def unregister(name: str) -> None:
    """Remove the variant called ``name`` from the registry (a test's own variant, say).

    Raises:
        ValueError: unknown name; the message lists the valid ones.
    """
    get_variant(name)
    del _REGISTRY[name]


@contextmanager
def temporary_variant(cls: type[Variant]) -> Iterator[type[Variant]]:
    """``with temporary_variant(MyVariant):`` the variant is registered inside the block only.

    A variant it replaced under the same name is registered again afterwards.
    """
    replaced = _REGISTRY.get(cls.name)
    register(cls)
    try:
        yield cls
    finally:
        if replaced is None:
            _REGISTRY.pop(cls.name, None)
        else:
            _REGISTRY[cls.name] = replaced


def variant_names() -> tuple[str, ...]:
    """The names of the registered variants now, in registration order (``wb.VARIANTS``)."""
    return tuple(_REGISTRY)


def get_variant(name: str) -> Variant:
    """The variant called ``name``: its options, ``uses_alpha``, ``reducible``, ``peft_type``, ...

    Raises:
        ValueError: unknown name; the message lists the valid ones.
    """
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown variant {name!r}; valid variants: {', '.join(_REGISTRY)}") from None


def variant_options(name: str) -> dict[str, Option]:
    """The options of the variant called ``name``: each one's default, valid values, help and choices.

    Example::

        >>> wb.variant_options("lora-plus")["lr_ratio"].default
        16.0

    Raises:
        ValueError: unknown name; the message lists the valid ones.
    """
    return dict(get_variant(name).options)
