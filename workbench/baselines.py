"""The baselines adapters are measured against: full fine-tuning, and a head trained on a frozen base.

They are not adapters: no layer is replaced, nothing is low-rank, and they are not in the variant
registry (``wb.VARIANTS`` stays the adapters). A run, a sweep, the CLI and the panel take their
names where they take a variant's, and they train with the same trainer, checkpoints and record:

* ``"full"``: every parameter of the task's base model trains (full fine-tuning).
* ``"head"``: the base is frozen and only the ``train=`` modules train (the task's
  ``default_train``, e.g. ``["classifier"]``, the new head of ``reviews``).

A baseline has no rank, no alpha, no targets and no options: its run records ``rank: None``,
``alpha: None``, ``targets: None`` and ``options: {}``, and refuses any of them when given.

Example::

    wb.train("digits", "head", None, "runs/head", train=["head"], lr=3e-3)
    wb.sweep("reviews", ["lora", "full", "head"], ranks=[8], lrs={"lora": [2e-3], "full": [1e-4], "head": [2e-3]})
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from .adapters import variant_names, variant_options
from .targets import find_trained

BASELINES: dict[str, str] = {
    "full": "full fine-tuning: every parameter of the base model trains",
    "head": "a frozen base: only the train= modules (the task's default, e.g. a new classifier) train",
}
ADAPTER_SETTINGS = ("alpha", "targets")  # the settings of adapters that no baseline takes (with rank and options)
TAKES_TRAIN = {"full": False, "head": True}  # whether the baseline's trained modules are named by train=


def is_baseline(name: object) -> bool:
    """Whether ``name`` names a baseline (``BASELINES``), not an adapter variant."""
    return isinstance(name, str) and name in BASELINES


def _check_name(name: str) -> None:
    if not is_baseline(name):
        raise ValueError(f"unknown baseline {name!r}; valid baselines: {', '.join(BASELINES)}")


def check_baseline_settings(name: str, rank: object = None, alpha: object = None, targets: object = None,
                            train: object = None, options: Mapping[str, Any] | None = None) -> None:
    """Refuse the adapter settings a baseline has no use for: a rank, alpha, targets, options (and train for full).

    Raises:
        ValueError: an unknown baseline, or a setting it does not take, naming the setting and the fix.
    """
    _check_name(name)
    what = f"baseline {name!r} ({BASELINES[name]})"
    if rank is not None:
        raise ValueError(f"{what} has no rank: it adds no adapter. Pass rank=None (on the command line, leave out "
                         f"--rank), not {rank!r}")
    if alpha is not None:
        raise ValueError(f"{what} has no alpha: it adds no adapter. Leave alpha=None, not {alpha!r}")
    if targets is not None:
        raise ValueError(f"{what} has no targets: it adapts no layer. Leave targets=None, not {targets!r}"
                         + ("; name the modules to train with train=[...]" if TAKES_TRAIN[name] else ""))
    if train is not None and not TAKES_TRAIN[name]:
        raise ValueError(f"{what} trains every parameter, so train= has nothing to choose; leave train=None, not "
                         f"{train!r} (baseline 'head' trains only the train= modules)")
    if options:
        raise ValueError(f"{what} takes no options: they are adapter variants' ({', '.join(sorted(options))} "
                         "given); leave them out")


def check_train(name: str, train: Sequence[str] | str | None, modules: Sequence[str] = ()) -> None:
    """Refuse a baseline that trains the ``train=`` modules (head) when there are none.

    Args:
        train: the resolved train patterns (given, else the task's ``default_train``).
        modules: the model's top-level module names, named in the message when known.

    Raises:
        ValueError: head with no train modules, naming the fix ``train=[...]``.
    """
    _check_name(name)
    if TAKES_TRAIN[name] and (train is None or (not isinstance(train, str) and not train)):
        among = f" of the model's modules ({', '.join(modules)})" if modules else ""
        raise ValueError(f"baseline {name!r} trains only the train= modules on a frozen base, and none are given "
                         f"(the task has no default_train): name them, e.g. train=[...]{among}; on the command "
                         "line, --train")


def baseline_settings(name: str, settings: Mapping[str, Any]) -> dict[str, Any]:
    """``settings`` shared by a sweep's trials without those the baseline has no use for.

    Left out: alpha, targets, every registered variant's options, and train for ``"full"``; so
    one sweep compares ``lora`` on chosen targets, with its options, to ``full`` and ``head``.
    """
    _check_name(name)
    options = {option for variant in variant_names() for option in variant_options(variant)}
    dropped = {*ADAPTER_SETTINGS, *options, *(() if TAKES_TRAIN[name] else ("train",))}
    return {key: value for key, value in settings.items() if key not in dropped}


def prepare_baseline(model: nn.Module, name: str, train: Sequence[str] | str | None = None) -> nn.Module:
    """Set ``requires_grad`` on the base model for a baseline: every parameter for full, the train modules for head.

    Args:
        model: the task's base model (``Task.base_model()``), not adapted.
        name: ``"full"`` or ``"head"``.
        train: head only: the modules to train, patterns as ``wb.add_adapters``' train (resolved with
            ``workbench.targets.find_trained``); for full, None.

    Returns:
        The same model, its parameters' ``requires_grad`` set.

    Raises:
        ValueError: an unknown baseline; train given to full; head with no train modules (naming the
            model's top-level modules, the fix ``train=[...]``), or train patterns that
            ``find_trained`` refuses. The model is then unchanged.
    """
    check_baseline_settings(name, train=train)
    if not TAKES_TRAIN[name]:
        model.requires_grad_(True)
        return model
    check_train(name, train, [child for child, _ in model.named_children()])
    trained = find_trained(model, train)
    model.requires_grad_(False)
    for module in trained.values():
        module.requires_grad_(True)
    return model
