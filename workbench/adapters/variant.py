"""A variant is everything specific to one adapter method; the registry maps names to variants.

A new variant is one new file: a ``Variant`` subclass decorated with ``@register``, naming its
options, building its layers and, where it has one, its optimisation rule.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from .layer import AdapterLayer


@dataclass(frozen=True)
class Option:
    """One option of a variant: its default, and which values are valid.

    Args:
        default: the value used when the option is not given.
        valid: says whether a value is acceptable.
        expects: the valid values in words, for the error message, e.g. ``"a float in [0, 1)"``.
    """

    default: Any
    valid: Callable[[Any], bool]
    expects: str


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_finite_number(value: Any) -> bool:
    """Whether ``value`` is an int or float (not a bool) other than NaN, inf and -inf."""
    return _is_number(value) and math.isfinite(value)


def dropout_option() -> Option:
    return Option(0.0, lambda p: _is_number(p) and 0 <= p < 1, "a float in [0, 1)")


def flag_option(default: bool = False) -> Option:
    return Option(default, lambda v: isinstance(v, bool), "True or False")


def number_option(default: float) -> Option:
    """Any finite number: NaN or an infinity would make every output NaN or infinite."""
    return Option(default, is_finite_number, "a finite number")


def positive_option(default: float) -> Option:
    return Option(default, lambda v: is_finite_number(v) and v > 0, "a finite number > 0")


INITS: tuple[str, ...] = ("default", "pissa")


def init_option() -> Option:
    """How A and B start: ``"default"`` (B A = 0) or ``"pissa"`` (the top-r SVD of W; see ``LoRALinear``)."""
    return Option("default", lambda v: v in INITS, " or ".join(repr(i) for i in INITS))


def count_option(default: int) -> Option:
    return Option(
        default, lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0, "an integer >= 0"
    )


class Variant(ABC):
    """The behaviour of one adapter method, as used by ``add_adapters`` and ``make_optimizer``.

    Class attributes:
        name: the name users pass, e.g. ``"lora"``.
        options: the variant's keyword options and their defaults.
        uses_alpha: whether the update is scaled by alpha / r (VeRA has no alpha).
        rank_limited: whether r must be at most min(in, out) of each layer.
        peft_type: the PEFT adapter type it exports as (``"LORA"`` or ``"VERA"``).
        moves_base_weights: whether training changes the adapted layers' base weights, so a
            checkpoint of what training changes must hold them.
    """

    name: ClassVar[str]
    options: ClassVar[Mapping[str, Option]]
    uses_alpha: ClassVar[bool] = True
    rank_limited: ClassVar[bool] = True
    peft_type: ClassVar[str] = "LORA"
    moves_base_weights: ClassVar[bool] = False

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


_REGISTRY: dict[str, Variant] = {}


def register(cls: type[Variant]) -> type[Variant]:
    """Class decorator: make the variant available under ``cls.name``."""
    _REGISTRY[cls.name] = cls()
    return cls


def registered() -> tuple[str, ...]:
    """The names of the registered variants, in registration order."""
    return tuple(_REGISTRY)


def get_variant(name: str) -> Variant:
    """The variant called ``name``.

    Raises:
        ValueError: unknown name; the message lists the valid ones.
    """
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown variant {name!r}; valid variants: {', '.join(_REGISTRY)}") from None
