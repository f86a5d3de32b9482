"""PEFT's adapter format, both ways: ``adapter_config.json`` + ``adapter_model.safetensors``.

Tensor keys follow peft's saved layout for a base model whose module ``<name>`` is adapted::

    base_model.model.<name>.lora_A.weight      (r, in)      LoRA
    base_model.model.<name>.lora_B.weight      (out, r)
    base_model.model.<name>.vera_lambda_d      (r,)         VeRA
    base_model.model.<name>.vera_lambda_b      (out,)
    base_model.vera_A, base_model.vera_B       (r, max_in), (max_out, r), shared

Every LoRA-based variant (lora, lora-fa, lora-plus, delta-lora) exports as a plain LoRA: the
forward of each is W x + s B A x. Only safetensors and JSON are read: never a pickle.
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .adapt import adapter_config, add_adapters, refuse_adapted, remove_adapters
from .adapters import adapter_layers, get_variant, is_supported, linear_shape
from .adapters.layer import _is_conv1d
from .checkpoints.files import to_json, write_file, write_text

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_PREFIX = "base_model.model."
_DELTA_LORA_NOTE = (
    "This adapter was trained with Delta-LoRA, which also moved the base weights of the adapted "
    "layers. The file holds only A and B: load it on those moved weights (save them yourself, "
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

    Which variants convert, and how:

    - lora, lora-fa, lora-plus, delta-lora: a plain peft LoRA (lora-fa's frozen A and LoRA+'s
      learning rates are training details; the forward is W x + s B A x).
    - with ``init="pissa"`` the layers hold the residual W_res = W - s B0 A0, but peft applies
      the adapter to the original W. Since W_res + s B A = W + s (B A - B0 A0), each layer is
      written as the exact rank-2r LoRA B' = [B, -B0], A' = [A; A0] with the same scale s
      (lora_alpha doubled, or times sqrt(2) with rslora), as peft's own
      ``path_initial_model_for_weight_conversion`` does.
    - after ``wb.reduce_rank`` left layers with different ranks, peft's ``rank_pattern`` and
      ``alpha_pattern`` give each layer its rank and the alpha that keeps its scale s.
      (``wb.import_peft`` reads uniform ranks only.)
    - vera: peft's VeRA, with the shared projections saved.

    The file is meant for the original base model, which is what peft applies it to. For
    delta-lora the base weights moved during training; a warning and the directory's README.md
    say so. Each file is written atomically, with the permissions the umask gives.

    Raises:
        ValueError: the model has no adapters, or ``directory`` is a file.
    """
    config = adapter_config(model)
    variant = get_variant(config.variant)
    layers = dict(adapter_layers(model))
    tensors: dict[str, torch.Tensor] = {}
    common = {
        "base_model_name_or_path": base_model_name_or_path,
        "bias": "none",
        "fan_in_fan_out": any(_is_conv1d(layer.base_layer) for layer in layers.values()),
        "inference_mode": True,
        "modules_to_save": None,
        "r": config.rank,
        "target_modules": _exact_names_pattern(list(layers)),
        "task_type": None,
    }
    if variant.peft_type == "LORA":
        ranks = {}
        for name, layer in layers.items():
            a, b = layer.lora_A, layer.lora_B
            if layer.initial_update() is not None:  # PiSSA: W_res + s B A = W + s (B A - B0 A0)
                a, b = torch.cat([a, layer.lora_A0]), torch.cat([b, -layer.lora_B0], dim=1)
            tensors[f"{_PREFIX}{name}.lora_A.weight"] = a
            tensors[f"{_PREFIX}{name}.lora_B.weight"] = b
            ranks[name] = a.shape[0]
        rank = max(ranks.values())
        peft_config = {
            **common,
            "peft_type": "LORA",
            "r": rank,
            "lora_alpha": _alpha_for(rank, config.rank, config.alpha, config.options["rslora"]),
            "lora_dropout": config.options.get("dropout", 0.0),
            "use_rslora": config.options["rslora"],
            "init_lora_weights": True,
        }
        # peft matches pattern keys as r"(.*\.)?(key)$": the longest name first, so a layer never takes
        # the rank of another whose name ends its own.
        differing = sorted((name for name in ranks if ranks[name] != rank), key=len, reverse=True)
        if differing:
            peft_config["rank_pattern"] = {re.escape(name): ranks[name] for name in differing}
            peft_config["alpha_pattern"] = {
                re.escape(name): _alpha_for(ranks[name], config.rank, config.alpha, config.options["rslora"])
                for name in differing
            }
    else:
        for name, layer in layers.items():
            tensors[f"{_PREFIX}{name}.vera_lambda_d"] = layer.vera_lambda_d
            tensors[f"{_PREFIX}{name}.vera_lambda_b"] = layer.vera_lambda_b
        first = next(iter(layers.values()))
        tensors["base_model.vera_A"], tensors["base_model.vera_B"] = first.vera_A, first.vera_B
        peft_config = {
            **common,
            "peft_type": "VERA",
            "projection_prng_key": config.options["projection_seed"],
            "save_projection": True,
            "vera_dropout": config.options["dropout"],
            "d_initial": config.options["d_initial"],
            "init_weights": True,
        }
    tensors = {key: t.detach().to("cpu").contiguous().clone() for key, t in tensors.items()}

    out = Path(directory)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} is a file; an adapter is written as a directory: give a new or empty directory")
    text = to_json(peft_config, indent=2) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    write_file(out / WEIGHTS_FILE, lambda p: save_file(tensors, p, metadata={"format": "pt"}))
    write_text(out / CONFIG_FILE, text)
    readme = f"# Adapter ({config.variant}, r={config.rank})\n\nWritten by the adapter workbench in peft's format.\n"
    if config.variant == "delta-lora":
        warnings.warn(_DELTA_LORA_NOTE, stacklevel=2)
        readme += "\n" + _DELTA_LORA_NOTE + "\n"
    write_text(out / "README.md", readme)
    return out


def _alpha_for(rank: int, config_rank: int, alpha: float, rslora: bool) -> float:
    """The alpha that gives a rank-``rank`` peft LoRA the scale alpha / config_rank (or / sqrt) of ours."""
    ratio = rank / config_rank
    return alpha * (math.sqrt(ratio) if rslora else ratio)


_UNSUPPORTED = {
    "use_dora": False,
    "rank_pattern": {},
    "alpha_pattern": {},
    "layers_to_transform": None,
    "layer_replication": None,
    "modules_to_save": None,
    "lora_bias": False,
    "target_parameters": None,
    "trainable_token_indices": None,
}


def _read_adapter(directory: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
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
    if config.get("peft_type") not in ("LORA", "VERA"):
        raise ValueError(f"peft_type {config.get('peft_type')!r} in {config_path} is not supported; valid: LORA, VERA")
    for key, default in _UNSUPPORTED.items():
        if config.get(key, default) not in (default, None, {}, False):
            raise ValueError(
                f"{config_path}: {key}={config[key]!r} is not supported (only plain {config['peft_type']})"
            )
    if config.get("bias", "none") != "none":
        raise ValueError(f"{config_path}: bias={config['bias']!r} is not supported; only 'none'")
    try:
        tensors = load_file(weights_path)
    except Exception as error:  # safetensors raises its own error types for a truncated or malformed file
        raise ValueError(f"{weights_path}: not a readable safetensors file ({error})") from None
    return config, tensors


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
             isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
             and (kind is float or float(value).is_integer()))
    if not valid:
        raise ValueError(f"{CONFIG_FILE}: {key}={value!r} is not {'a boolean' if kind is bool else 'a finite number'}")
    return kind(value)


def _parse_keys(tensors: dict[str, torch.Tensor], suffixes: tuple[str, ...], shared: tuple[str, ...]) -> list[str]:
    """The adapted module names, in file order; refuses a key that fits no expected pattern."""
    names: list[str] = []
    for key in tensors:
        if key in shared:
            continue
        suffix = next((s for s in suffixes if key.endswith("." + s)), None)
        if not key.startswith(_PREFIX) or suffix is None:
            expected = f"{_PREFIX}<module>.<{'|'.join(suffixes)}>"
            raise ValueError(f"unexpected tensor {key!r} in the adapter file; expected {expected}")
        name = key[len(_PREFIX) : -len(suffix) - 1]
        if name not in names:
            names.append(name)
    return names


def import_peft(model: nn.Module, directory: str | os.PathLike[str]) -> nn.Module:
    """Load an adapter that peft saved (LoRA or VeRA) onto ``model``, with peft's outputs.

    ``model`` must be the base model the adapter was trained on, without adapters. A LoRA
    adapter becomes variant ``"lora"``, a VeRA adapter ``"vera"`` (with the saved projections
    when the file holds them, else regenerated from ``projection_prng_key``).

    Raises:
        ValueError: not a peft directory, a pickle-only adapter, an unreadable or truncated file, a
            config missing a field peft writes (r, lora_alpha) or with a value of the wrong type, an
            adapter type or feature this library does not have, or tensors that do not fit the model.
            The model is then unchanged.
    """
    refuse_adapted(model)
    directory = Path(directory)
    config, tensors = _read_adapter(directory)
    rank = _field(config, "r", int)
    if config["peft_type"] == "LORA":
        names = _parse_keys(tensors, ("lora_A.weight", "lora_B.weight"), ())
        expected = {"lora_A.weight": lambda i, o: (rank, i), "lora_B.weight": lambda i, o: (o, rank)}
        args: dict[str, Any] = {
            "variant": "lora",
            "alpha": _field(config, "lora_alpha", float),
            "dropout": _field(config, "lora_dropout", float, 0.0),
            "rslora": _field(config, "use_rslora", bool, False),
        }
    else:
        names = _parse_keys(tensors, ("vera_lambda_d", "vera_lambda_b"), ("base_model.vera_A", "base_model.vera_B"))
        expected = {"vera_lambda_d": lambda i, o: (rank,), "vera_lambda_b": lambda i, o: (o,)}
        args = {
            "variant": "vera",
            "d_initial": _field(config, "d_initial", float, 0.1),
            "dropout": _field(config, "vera_dropout", float, 0.0),
            "projection_seed": _field(config, "projection_prng_key", int, 0),
        }
    for name in names:
        module = model.get_submodule(name) if _has_module(model, name) else None
        if module is None or not is_supported(module):
            raise ValueError(f"the adapter adapts {name!r}, which the model has no linear layer for")
        in_features, out_features = linear_shape(module)
        for suffix, shape_of in expected.items():
            key = f"{_PREFIX}{name}.{suffix}"
            if key not in tensors:
                raise ValueError(f"the adapter file lacks {key!r}")
            if tuple(tensors[key].shape) != shape_of(in_features, out_features):
                raise ValueError(
                    f"{key} has shape {tuple(tensors[key].shape)} but the model's {name!r} needs "
                    f"{shape_of(in_features, out_features)}"
                )

    variant = args.pop("variant")
    add_adapters(model, variant, rank, args.pop("alpha", None), _exact_names_pattern(names), **args)
    try:
        _load_tensors(model, tensors)
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


@torch.no_grad()
def _load_tensors(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    layers = dict(adapter_layers(model))
    first = next(iter(layers.values()))
    for key in ("base_model.vera_A", "base_model.vera_B"):
        if key in tensors:
            shared = getattr(first, key.rsplit(".", 1)[1])
            if shared.shape != tensors[key].shape:
                raise ValueError(f"{key} has shape {tuple(tensors[key].shape)}; this model needs {tuple(shared.shape)}")
            shared.copy_(tensors[key])  # one tensor, shared by every layer
    for key, value in tensors.items():
        if key.startswith(_PREFIX):
            name, _, attribute = key[len(_PREFIX) :].rpartition(".")
            if attribute == "weight":  # lora_A.weight -> lora_A
                name, _, attribute = name.rpartition(".")
            getattr(layers[name], attribute).copy_(value)
