"""Nested training state <-> JSON plus tensors, so no state ever needs pickle.

``optimizer.state_dict()``, RNG states and data loader states are trees of dicts (sometimes
with int keys), lists, tuples, numbers, strings, NumPy arrays and tensors. ``encode`` turns
such a tree into JSON-able values, handing every tensor to a callback that says how it is
stored (a key into a safetensors file, or inline); ``decode`` is the exact inverse.

Markers (single-key dicts) keep what JSON would lose::

    {"__tensor__": ref}                 a tensor, ref as returned by the store callback
    {"__tuple__": [...]}                a tuple (random.setstate needs tuples)
    {"__dict__": [[key, value], ...]}   a dict whose keys are not all strings (optimizer state)
    {"__ndarray__": ref}                a NumPy array (NumPy's RNG state), stored as a tensor
"""

from __future__ import annotations

import base64
import zlib
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

Json = Any
_MARKERS = ("__tensor__", "__tuple__", "__dict__", "__ndarray__")


def _join(path: str, key: object) -> str:
    return f"{path}.{key}" if path else str(key)


def encode(value: Any, store: Callable[[str, torch.Tensor], Json], path: str = "") -> Json:
    """``value`` as JSON-able data; ``store(path, tensor)`` returns each tensor's reference.

    Raises:
        TypeError: a value of another type, naming where it is in the tree.
    """
    if isinstance(value, torch.Tensor):
        return {"__tensor__": store(path, value)}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, tuple):
        return {"__tuple__": [encode(v, store, _join(path, i)) for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [encode(v, store, _join(path, i)) for i, v in enumerate(value)]
    if isinstance(value, np.ndarray):
        return {"__ndarray__": store(path, torch.from_numpy(np.ascontiguousarray(value)))}
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value) and not any(k in _MARKERS for k in value):
            return {k: encode(v, store, _join(path, k)) for k, v in value.items()}
        return {"__dict__": [[encode(k, store), encode(v, store, _join(path, k))] for k, v in value.items()]}
    raise TypeError(f"cannot store a {type(value).__name__} at {path or 'the top'}: use tensors, numbers, strings, "
                    "lists, tuples, dicts or NumPy arrays")


def decode(data: Json, load: Callable[[Json], torch.Tensor]) -> Any:
    """The inverse of ``encode``; ``load(ref)`` returns the tensor a reference names."""
    if isinstance(data, list):
        return [decode(v, load) for v in data]
    if not isinstance(data, dict):
        return data
    if "__tensor__" in data:
        return load(data["__tensor__"])
    if "__tuple__" in data:
        return tuple(decode(v, load) for v in data["__tuple__"])
    if "__dict__" in data:
        return {decode(k, load): decode(v, load) for k, v in data["__dict__"]}
    if "__ndarray__" in data:
        return load(data["__ndarray__"]).numpy()
    return {k: decode(v, load) for k, v in data.items()}


def tensor_to_json(_: str, tensor: torch.Tensor) -> Json:
    """A store callback that keeps a (small) tensor inline: dtype, shape, zlib'd bytes in base64."""
    tensor = tensor.detach().cpu().contiguous()
    raw = zlib.compress(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return {"dtype": str(tensor.dtype).removeprefix("torch."), "shape": list(tensor.shape),
            "zlib_base64": base64.b64encode(raw).decode("ascii")}


def tensor_from_json(ref: Json) -> torch.Tensor:
    """The inverse of ``tensor_to_json``."""
    dtype = getattr(torch, ref["dtype"])
    raw = bytearray(zlib.decompress(base64.b64decode(ref["zlib_base64"])))
    if not raw:
        return torch.empty(ref["shape"], dtype=dtype)
    return torch.frombuffer(raw, dtype=torch.uint8).view(dtype).reshape(ref["shape"]).clone()
