"""Tasks: a pre-trained base model, the data to adapt it on, and how to score it.

Built in, on real text with pretrained transformers (offline, from packages that ship them):
``"reviews"`` (MiniLM classifying Rotten Tomatoes snippets as fresh or rotten) and ``"hamlet"``
(SmolLM2-135M adapted to Shakespeare, with a forgetting metric). Your own model and data:
``text_classification`` and ``causal_lm``. The fast tasks, for tests and quick demos:
``"digits"`` (an MLP pre-trained on 8x8 digits, adapted to mirrored digits; also
``"digits-rotate"`` and ``"digits-invert"``) and ``"sequence"`` (a tiny transformer pre-trained
to copy sequences, adapted to reverse them). Their base models are pre-trained on first use and
cached.
"""

from __future__ import annotations

from collections.abc import Callable

from .base import SPLITS, Task, classification_counts, classification_loss, make_loaders
from .digits import digits
from .hamlet import hamlet
from .packaged import INSTALL, PackagedFileError
from .reviews import reviews
from .sequence import sequence
from .text import CausalLM, TextClassifier, causal_lm, from_source, generate, predict, text_classification

TASKS: dict[str, Callable[[], Task]] = {
    "digits": digits,
    "digits-rotate": lambda: digits("rotate"),
    "digits-invert": lambda: digits("invert"),
    "sequence": sequence,
    "reviews": reviews,
    "hamlet": hamlet,
}


def get_task(name: str) -> Task:
    """The built-in task called ``name``, one of ``TASKS``.

    Raises:
        ValueError: an unknown name; the message lists the valid ones.
    """
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; valid tasks: {', '.join(TASKS)}")
    return TASKS[name]()


__all__ = ["INSTALL", "SPLITS", "TASKS", "CausalLM", "PackagedFileError", "Task", "TextClassifier", "causal_lm",
           "classification_counts", "classification_loss", "digits", "from_source", "generate", "get_task",
           "hamlet", "make_loaders", "predict", "reviews", "sequence", "text_classification"]
