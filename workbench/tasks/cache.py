"""Pre-trained base models, cached as safetensors files so each is pre-trained once per machine.

Also converted models (``cached_directory``): a directory another format converts to once, such
as a GGUF file de-quantized to a transformers directory, with a manifest of its files' SHA-256.

The files live in ``$WORKBENCH_CACHE`` if it is set, else in the user's cache directory
(``platformdirs.user_cache_dir("adapter-workbench")``, e.g. ``~/.cache/adapter-workbench``), one
file per model and version: ``<name>-v<version>.safetensors``. Each file's metadata holds the
SHA-256 of its tensors, so a truncated, corrupted or out-of-date file is noticed, reported with a
warning, and replaced by pre-training again. Deleting the directory is always safe.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path

import platformdirs
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from ..checkpoints.files import sha256, sha256_once, write_directory, write_file

CACHE_ENV = "WORKBENCH_CACHE"
SEED = 0
PRETRAIN_THREADS = 1  # pre-training runs on this many threads, so its result does not depend on the caller's


class InvalidCacheError(Exception):
    """A cache file that cannot be used; the message says why."""


def cache_dir() -> Path:
    """``$WORKBENCH_CACHE`` if set, else the user's cache directory for ``adapter-workbench``."""
    return Path(os.environ.get(CACHE_ENV) or platformdirs.user_cache_dir("adapter-workbench"))


def cache_path(name: str, version: int) -> Path:
    """Where ``cached_model(name, version, ...)`` keeps its weights."""
    return cache_dir() / f"{name}-v{version}.safetensors"


def tensors_sha256(tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over every tensor in key order: its name, dtype and shape, then its raw bytes."""
    digest = hashlib.sha256()
    for key in sorted(tensors):
        tensor = tensors[key].detach().cpu().contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def cached_model(name: str, version: int, build: Callable[[], nn.Module],
                 pretrain: Callable[[nn.Module], None]) -> nn.Module:
    """A pre-trained model: loaded from the cache, or pre-trained and then cached.

    ``build`` makes the architecture and ``pretrain`` trains it in place. Both run with torch's
    global RNG seeded to a fixed value inside ``torch.random.fork_rng`` and on ``PRETRAIN_THREADS``
    threads (a float32 sum split over another number of threads rounds differently), so the model
    is the same on every call, whatever the caller's thread count, and the caller's RNG state and
    thread count are left exactly as they were. The cache file is written atomically
    (``write_file``), so concurrent processes and crashes never leave a half-written file behind.

    Args:
        name: the model's name, part of the file name, e.g. ``"digits-mlp"``.
        version: part of the file name; raise it whenever the architecture or the pre-training
            recipe changes, so that old files are no longer used.
        build: returns the untrained architecture.
        pretrain: trains the model in place; called only when there is no valid cache file.

    Returns:
        The pre-trained model, a fresh copy on each call, in training mode.

    Warns:
        UserWarning: the cache file was invalid (unreadable, truncated, keys or shapes that do not
            match ``build()``, or tensors whose SHA-256 differs from the one recorded), or the
            cache directory cannot be written; the model is pre-trained anyway.
    """
    path = cache_path(name, version)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = build()
        if path.exists():
            try:
                model.load_state_dict(load_tensors(path, model.state_dict()))
                return model
            except InvalidCacheError as error:
                warnings.warn(f"cache file {path} is invalid ({error}); pre-training {name!r} again", stacklevel=2)
        threads = torch.get_num_threads()
        torch.set_num_threads(PRETRAIN_THREADS)
        try:
            pretrain(model)
        finally:
            torch.set_num_threads(threads)
    try:
        save_tensors(path, model.state_dict())
    except OSError as error:
        warnings.warn(f"could not write cache file {path} ({error}); {name!r} will be pre-trained again next time",
                      stacklevel=2)
    return model


def load_tensors(path: Path, expected: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors of ``path``, checked against the names, shapes and dtypes of ``expected`` and the stored hash.

    Raises:
        InvalidCacheError: the file is unreadable or truncated, has missing or extra tensors, a
            tensor of the wrong shape or dtype, or bytes whose SHA-256 is not the recorded one.
    """
    try:
        with safe_open(path, framework="pt") as file:
            recorded = (file.metadata() or {}).get("sha256")
            tensors = {key: file.get_tensor(key) for key in file.keys()}
    except (OSError, SafetensorError) as error:
        raise InvalidCacheError(f"unreadable: {error}") from error
    missing, extra = sorted(expected.keys() - tensors.keys()), sorted(tensors.keys() - expected.keys())
    if missing or extra:
        raise InvalidCacheError(f"missing tensors {missing}, unexpected tensors {extra}")
    for key, tensor in tensors.items():
        want = expected[key]
        if tensor.shape != want.shape or tensor.dtype != want.dtype:
            raise InvalidCacheError(f"tensor {key!r} is {tensor.dtype} {tuple(tensor.shape)}, "
                                    f"expected {want.dtype} {tuple(want.shape)}")
    if recorded != tensors_sha256(tensors):
        raise InvalidCacheError("the tensors' SHA-256 differs from the one recorded")
    return tensors


def save_tensors(path: Path, tensors: Mapping[str, torch.Tensor]) -> None:
    """Write ``tensors`` and their SHA-256 to ``path`` atomically (``write_file``: a temporary sibling, renamed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {key: tensor.detach().cpu().contiguous() for key, tensor in tensors.items()}
    write_file(path, lambda tmp: save_file(tensors, tmp, metadata={"sha256": tensors_sha256(tensors)}))


MANIFEST = "manifest.json"


def cached_directory(name: str, version: int, fill: Callable[[Path], None]) -> Path:
    """A cached directory ``<cache>/<name>-v<version>``: verified, or made by ``fill`` first.

    ``fill(tmp)`` writes the files (flat, no subdirectories) into a temporary directory; a
    manifest of their SHA-256 is added and the directory renamed into place at once
    (``write_directory``), so a crash leaves no half-made directory. A directory whose files do
    not match its manifest (truncated, edited) is reported with a warning, removed and made again.

    Returns:
        The directory's path.

    Raises:
        OSError: the cache directory cannot be written and holds no valid copy.
    """
    path = cache_dir() / f"{name}-v{version}"
    if path.exists():
        problem = _directory_problem(path)
        if problem is None:
            return path
        warnings.warn(f"cache directory {path} is invalid ({problem}); making it again", stacklevel=2)
        shutil.rmtree(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    def fill_and_list(tmp: Path) -> None:
        fill(tmp)
        files = {file.name: sha256(file) for file in sorted(tmp.iterdir())}
        (tmp / MANIFEST).write_text(json.dumps(files, indent=1))

    try:
        write_directory(path, fill_and_list)
    except OSError:
        if not path.exists() or _directory_problem(path) is not None:  # not another process's copy either
            raise
    return path


def _directory_problem(path: Path) -> str | None:
    """Why the cached directory cannot be used, or None when every file matches its manifest.

    Each file is hashed once per state in a process (``sha256_once``).
    """
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError) as error:
        return f"no readable {MANIFEST}: {error}"
    for file, digest in manifest.items():
        if not (path / file).is_file():
            return f"{file} is missing"
        if sha256_once(path / file) != digest:
            return f"{file}'s SHA-256 differs from the manifest's"
    return None
