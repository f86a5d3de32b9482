"""The kinds of value the library's arguments take: one test each, so every check treats bools and NaN alike.

``True`` is an ``int`` to Python, but never a rank, a step or a learning rate here; NaN and the
infinities are floats, but never a valid setting.
"""

from __future__ import annotations

import math
from typing import Any


def is_integer(value: Any) -> bool:
    """Whether ``value`` is an ``int`` and not a ``bool``."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """Whether ``value`` is an ``int`` or a ``float``, and not a ``bool`` (NaN and infinities included)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_finite_number(value: Any) -> bool:
    """Whether ``value`` is an ``int`` or ``float`` (not a ``bool``) other than NaN, inf and -inf."""
    return is_number(value) and math.isfinite(value)
