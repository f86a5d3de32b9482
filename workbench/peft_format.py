"""PEFT's adapter format, both ways: ``adapter_config.json`` + ``adapter_model.safetensors``.

This module is the container: the two files, read and written (atomically), the key layout and
the peft features that are refused. What each variant writes and reads is the variant's own
(``Variant.peft_type``, ``to_peft``, ``from_peft``, ``load_peft``, in its file). Tensor keys follow
peft's saved layout for a base model whose module ``<name>`` is adapted::

    base_model.model.<name>.<tensor>       a layer's tensor, e.g. lora_A.weight (r, in), vera_lambda_b (out,)
    base_model.<tensor>                    a tensor of the whole model, e.g. VeRA's shared vera_A
    base_model.model.<module>.<key>        a module trained in full (``train=``, peft's ``modules_to_save``):
                                           its whole state dict, e.g. classifier.weight, classifier.bias

Modules trained in full are the container's, the same for every variant: peft lists them in
``modules_to_save`` and saves each one's state dict under the module's own name (in memory peft
holds a copy, ``<module>.modules_to_save.default``; the file drops that part of the key).

Every LoRA-based variant (lora, lora-fa, lora-plus, delta-lora) exports as a plain LoRA: the
forward of each is W x + s B A x; DoRA as a LoRA with ``use_dora=True`` and its magnitude vectors
(``lora_magnitude_vector``, (out,)). Only safetensors and JSON are read: never a pickle.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .adapt import adapter_config, add_adapters, refuse_adapted, remove_adapters
from .adapters import (
    AdapterLayer,
    PeftTensors,
    Variant,
    adapter_layers,
    get_variant,
    is_conv1d,
    is_supported,
    variant_names,
)
from .checkpoints.files import to_json, write_file, write_text
from .checks import is_finite_number

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_SHARED_PREFIX = "base_model."
_PREFIX = "base_model.model."


def _moved_weights_note(variant: str) -> str:
    return (
        f"This adapter was trained with variant {variant!r}, which also moved the base weights of the adapted "
        "layers. The file holds only the adapter: load it on those moved weights (save them yourself, "
        "e.g. with the state_dict of wb.remove_adapters(model), which adds PiSSA's B0 A0 back), not on "
        "the original base model, to get the trained outputs."
    )


def _exact_names_pattern(names: list[str]) -> str:
    """A regex that peft and ``find_targets`` both fullmatch against exactly these names."""
    return "(?:" + "|".join(re.escape(name) for name in names) + ")"


def export_peft(
    model: nn.Module, directory: str | os.PathLike[str], base_model_name_or_path: str | None = None
) -> Path:
    """Write the model's adapter in peft's format, for ``PeftModel.from_pretrained(base, directory)``.

    Args:
        model: a model adapted with ``wb.add_adapters`` (merged or not).
        directory: created if missing; existing adapter files in it are replaced.
        base_model_name_or_path: recorded in the config, as peft does.

    Returns:
        The directory.

    How a variant converts is its own (``Variant.to_peft``, in its file):

    - lora, lora-fa, lora-plus, delta-lora: a plain peft LoRA, as the forward of each is
      W x + s B A x; a PiSSA adapter as the exact rank-2r LoRA on the original W, and layers
      left with different ranks by ``wb.reduce_rank`` with peft's ``rank_pattern`` and
      ``alpha_pattern`` (``wb.import_peft`` reads uniform ranks only).
    - dora: peft's LoRA with ``use_dora=True``, each layer's magnitude saved beside A and B.
    - vera: peft's VeRA, with the shared projections saved.

    Modules trained in full (``add_adapters(..., train=[...])``) are written as peft writes its
    ``modules_to_save``: listed in the config, each module's state dict saved under its name. A
    weight two of them share (GPT-2's ``lm_head`` and ``transformer.wte``, both trained) is saved
    under both names; peft loads it into a copy per module, with the same outputs, but untied.

    The file is meant for the original base model, which is what peft applies it to. For a
    variant that moves the base weights in training (delta-lora) a warning and the directory's
    README.md say so. Each file is written atomically, with the permissions the umask gives.

    Raises:
        ValueError: the model has no adapters, its variant has no PEFT equivalent, a module
            trained in full whose name ends another module's name (peft selects
            ``modules_to_save`` by name ending, so it would train both), or ``directory`` is a file.
    """
    config = adapter_config(model)
    variant = get_variant(config.variant)
    layers = dict(adapter_layers(model))
    adapter, fields = variant.to_peft(layers, config)
    peft_config = {
        "base_model_name_or_path": base_model_name_or_path,
        "bias": "none",
        "fan_in_fan_out": any(is_conv1d(layer.base_layer) for layer in layers.values()),
        "inference_mode": True,
        "modules_to_save": list(config.train) or None,
        "r": config.rank,
        "target_modules": _exact_names_pattern(list(layers)),
        "task_type": None,
        "peft_type": variant.peft_type,
        **fields,
    }
    tensors = {f"{_PREFIX}{name}.{key}": t for name, named in adapter.layers.items() for key, t in named.items()}
    tensors |= {f"{_SHARED_PREFIX}{key}": t for key, t in adapter.shared.items()}
    tensors |= {f"{_PREFIX}{name}.{key}": t for name, module in _saved_modules(model, layers, config.train).items()
                for key, t in module.state_dict().items()}
    tensors = {key: t.detach().to("cpu").contiguous().clone() for key, t in tensors.items()}

    out = Path(directory)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} is a file; an adapter is written as a directory: give a new or empty directory")
    text = to_json(peft_config, indent=2) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    write_file(out / WEIGHTS_FILE, lambda p: save_file(tensors, p, metadata={"format": "pt"}))
    write_text(out / CONFIG_FILE, text)
    readme = f"# Adapter ({config.variant}, r={config.rank})\n\nWritten by the adapter workbench in peft's format.\n"
    if config.train:
        readme += f"\nTrained in full beside the adapter (peft's modules_to_save): {', '.join(config.train)}.\n"
    if variant.moves_base_weights:
        note = _moved_weights_note(config.variant)
        warnings.warn(note, stacklevel=2)
        readme += "\n" + note + "\n"
    write_text(out / "README.md", readme)
    return out


def _peft_selects(name: str, entries: list[str]) -> bool:
    """peft's rule for ``modules_to_save``: a module whose qualified name ends with an entry (``str.endswith``)."""
    return any(name.endswith(entry) for entry in entries)


def _saved_modules(model: nn.Module, layers: dict[str, AdapterLayer], train: tuple[str, ...]) -> dict[str, nn.Module]:
    """The modules trained in full, by name, checked to be what peft selects with ``modules_to_save=train``.

    Raises:
        ValueError: peft would select another module too (its name ends with a trained one's).
    """
    names = [name for name, _ in model.named_modules(remove_duplicate=False)
             if name and not any(name.startswith(layer + ".") for layer in layers)]  # peft's names: no adapter insides
    for trained in train:
        others = [name for name in names if name not in train and _peft_selects(name, [trained])]
        if others:
            raise ValueError(
                f"cannot export {trained!r} as peft's modules_to_save: peft selects those modules by the end of "
                f"their names (str.endswith), so it would also train {', '.join(map(repr, others))}, which this "
                "model does not; rename one of them, or train them too"
            )
    return {name: model.get_submodule(name) for name in train}


_UNSUPPORTED = {
    "use_dora": False,
    "rank_pattern": {},
    "alpha_pattern": {},
    "layers_to_transform": None,
    "layer_replication": None,
    "lora_bias": False,
    "target_parameters": None,
    "trainable_token_indices": None,
}


def _importer(config: dict[str, Any]) -> Variant | None:
    """The variant a peft adapter config imports as: the first registered of its ``peft_type`` whose
    ``peft_fields`` the config has (those with more fields first: DoRA's ``use_dora=True`` before LoRA)."""
    candidates = [get_variant(n) for n in variant_names() if get_variant(n).peft_type == config.get("peft_type")]
    matching = [v for v in candidates if all(config.get(key) == value for key, value in v.peft_fields.items())]
    return max(matching, key=lambda v: len(v.peft_fields), default=None)


def _read_adapter(directory: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], Variant]:
    config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    if not config_path.is_file():
        raise ValueError(f"{directory} is not a peft adapter directory: {CONFIG_FILE} is missing")
    if not weights_path.is_file():
        pickled = (directory / "adapter_model.bin").is_file()
        reason = "only adapter_model.bin, a pickle, which is never loaded" if pickled else f"no {WEIGHTS_FILE}"
        raise ValueError(f"{directory} holds {reason}; save the adapter with safe_serialization=True")
    try:
        config = json.loads(config_path.read_text())
    except ValueError as error:
        raise ValueError(f"{config_path}: not readable as JSON ({error})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{config_path}: not an adapter config (a JSON object with peft_type, r, ...)")
    variant = _importer(config)
    if variant is None:
        valid = ", ".join(dict.fromkeys(t for n in variant_names() if (t := get_variant(n).peft_type) is not None))
        raise ValueError(f"peft_type {config.get('peft_type')!r} in {config_path} is not supported; valid: {valid}")
    for key, default in _UNSUPPORTED.items():
        if key not in variant.peft_fields and config.get(key, default) not in (default, None, {}, False):
            raise ValueError(
                f"{config_path}: {key}={config[key]!r} is not supported (only plain {config['peft_type']})"
            )
    if config.get("bias", "none") != "none":
        raise ValueError(f"{config_path}: bias={config['bias']!r} is not supported; only 'none'")
    saved = config.get("modules_to_save")
    if saved is not None and (not isinstance(saved, list) or not all(isinstance(n, str) and n for n in saved)):
        raise ValueError(f"{config_path}: modules_to_save={saved!r} is not a list of module names")
    try:
        tensors = load_file(weights_path)
    except Exception as error:  # safetensors raises its own error types for a truncated or malformed file
        raise ValueError(f"{weights_path}: not a readable safetensors file ({error})") from None
    return config, tensors, variant


_REQUIRED = object()


def _field(config: dict[str, Any], key: str, kind: type, default: Any = _REQUIRED) -> Any:
    """``config[key]`` as ``kind`` (int or float: a finite number; bool: a JSON boolean), or its default.

    Raises:
        ValueError: the key is missing with no default, or its value is not of that kind.
    """
    if key not in config or config[key] is None:
        if default is _REQUIRED:
            raise ValueError(f"{CONFIG_FILE}: {key} is missing; peft writes it for a {config['peft_type']} adapter")
        return default
    value = config[key]
    valid = (isinstance(value, bool) if kind is bool else
             is_finite_number(value)
             and (kind is float or float(value).is_integer()))
    if not valid:
        raise ValueError(f"{CONFIG_FILE}: {key}={value!r} is not {'a boolean' if kind is bool else 'a finite number'}")
    return kind(value)


def _parse_keys(
    tensors: dict[str, torch.Tensor], variant: Variant, trained: list[str]
) -> tuple[PeftTensors, dict[str, dict[str, torch.Tensor]]]:
    """The file's tensors by adapted module (in file order) and shared name, and those of each ``trained`` module
    (``modules_to_save``) by state-dict key; refuses a key that fits no pattern."""
    adapter = PeftTensors({})
    saved: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        shared = key.removeprefix(_SHARED_PREFIX)
        if key.startswith(_SHARED_PREFIX) and shared in variant.peft_shared:
            adapter.shared[shared] = value
            continue
        path = key.removeprefix(_PREFIX)
        owner = next((name for name in trained if key.startswith(_PREFIX) and path.startswith(name + ".")), None)
        if owner is not None:
            saved.setdefault(owner, {})[path[len(owner) + 1 :]] = value
            continue
        suffix = next((s for s in variant.peft_tensors if key.endswith("." + s)), None)
        if not key.startswith(_PREFIX) or suffix is None:
            expected = f"{_PREFIX}<module>.<{'|'.join(variant.peft_tensors)}>"
            if trained:
                expected += f" or {_PREFIX}<module of modules_to_save: {', '.join(trained)}>.<tensor>"
            raise ValueError(f"unexpected tensor {key!r} in the adapter file; expected {expected}")
        adapter.layers.setdefault(key[len(_PREFIX) : -len(suffix) - 1], {})[suffix] = value
    return adapter, saved


def _modules_to_save(model: nn.Module, entries: list[str] | None) -> list[str]:
    """The modules of ``model`` that peft trains for ``modules_to_save=entries``, outermost, in module order.

    As peft does, an entry that ends no module's name selects nothing (peft adds ``"classifier"``
    and ``"score"`` to every sequence-classification adapter, whichever the model has); a module
    without parameters holds nothing to load.
    """
    if not entries:
        return []
    selected = [name for name, module in model.named_modules(remove_duplicate=False)
                if name and _peft_selects(name, entries) and any(True for _ in module.parameters())]
    return [name for name in selected if not any(name.startswith(outer + ".") for outer in selected)]


def _check_saved(model: nn.Module, trained: list[str], saved: dict[str, dict[str, torch.Tensor]]) -> None:
    """Check that the file holds each trained module's whole state dict, each tensor of the module's shape.

    Raises:
        ValueError: a tensor missing (peft saves them all), of another shape, or one the module does not have.
    """
    for name in trained:
        state = model.get_submodule(name).state_dict()
        given = saved.get(name, {})
        for key, target in state.items():
            if key not in given:
                raise ValueError(f"the adapter file lacks {key!r} of module {name!r}, which its modules_to_save "
                                 "names (peft saves the module's whole state dict)")
            if given[key].shape != target.shape:
                raise ValueError(f"{key} of {name!r} (modules_to_save) has shape {tuple(given[key].shape)} but the "
                                 f"model's {name!r} needs {tuple(target.shape)}")
        unknown = sorted(set(given) - set(state))
        if unknown:
            raise ValueError(f"unexpected tensor {f'{_PREFIX}{name}.{unknown[0]}'!r} in the adapter file: module "
                             f"{name!r} (modules_to_save) has no tensor {unknown[0]!r}; it has {', '.join(state)}")


def import_peft(model: nn.Module, directory: str | os.PathLike[str]) -> nn.Module:
    """Load an adapter that peft saved (LoRA or VeRA) onto ``model``, with peft's outputs.

    ``model`` must be the base model the adapter was trained on, without adapters. An adapter of
    a peft type becomes the first registered variant of that type whose ``peft_fields`` it has,
    which reads its config (``Variant.from_peft``) and tensors (``Variant.load_peft``): a LoRA
    adapter becomes variant ``"lora"`` (``"dora"`` with ``use_dora=True``), a VeRA adapter
    ``"vera"`` (with the saved projections when the file holds them, else regenerated from
    ``projection_prng_key``).

    The modules of ``modules_to_save`` are selected as peft selects them (every module whose name
    ends with an entry; an entry that matches none is skipped, as peft skips it), trained in full
    (``AdapterConfig.train``) and loaded with the saved values.

    Raises:
        ValueError: not a peft directory, a pickle-only adapter, an unreadable or truncated file, a
            config missing a field peft writes (r, lora_alpha) or with a value of the wrong type, an
            adapter type or feature this library does not have, or tensors that do not fit the model
            (a module of modules_to_save included). The model is then unchanged.
    """
    refuse_adapted(model)
    directory = Path(directory)
    config, tensors, variant = _read_adapter(directory)

    def field(key: str, kind: type, default: Any = _REQUIRED) -> Any:
        return _field(config, key, kind, default)

    rank = field("r", int)
    arguments = variant.from_peft(field)
    trained = _modules_to_save(model, config.get("modules_to_save"))
    adapter, saved = _parse_keys(tensors, variant, trained)
    for name in adapter.layers:
        module = model.get_submodule(name) if _has_module(model, name) else None
        if module is None or not is_supported(module):
            raise ValueError(f"the adapter adapts {name!r}, which the model has no linear layer for")
    _check_saved(model, trained, saved)
    alpha = arguments.pop("alpha", None)
    train = _exact_names_pattern(trained) if trained else None
    add_adapters(model, variant.name, rank, alpha, _exact_names_pattern(list(adapter.layers)), train=train,
                 **arguments)
    try:
        variant.load_peft(dict(adapter_layers(model)), adapter)
        with torch.no_grad():
            for name in trained:
                state = model.get_submodule(name).state_dict(keep_vars=True)
                for key, value in saved[name].items():
                    state[key].copy_(value)
    except BaseException:
        remove_adapters(model)
        raise
    return model


def _has_module(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True
