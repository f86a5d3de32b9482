"""Tasks: a pre-trained base model, the data to adapt it on, and how to score it.

Built in: ``"digits"`` (an MLP pre-trained on 8x8 digits, adapted to mirrored digits; also
``"digits-rotate"`` and ``"digits-invert"``) and ``"sequence"`` (a tiny transformer pre-trained to
copy sequences, adapted to reverse them). Base models are pre-trained on first use and cached.
"""

from __future__ import annotations

from collections.abc import Callable

from .base import SPLITS, Task, classification_counts, classification_loss, make_loaders
from .digits import digits
from .sequence import sequence

TASKS: dict[str, Callable[[], Task]] = {
    "digits": digits,
    "digits-rotate": lambda: digits("rotate"),
    "digits-invert": lambda: digits("invert"),
    "sequence": sequence,
}


def get_task(name: str) -> Task:
    """The built-in task called ``name``, one of ``TASKS``.

    Raises:
        ValueError: an unknown name; the message lists the valid ones.
    """
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; valid tasks: {', '.join(TASKS)}")
    return TASKS[name]()


__all__ = ["SPLITS", "TASKS", "Task", "classification_counts", "classification_loss", "digits", "get_task",
           "make_loaders", "sequence"]
