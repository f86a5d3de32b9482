"""One checkpoint: what it holds, how it is written, verified and loaded.

A checkpoint is a directory of exactly these files::

    model.safetensors      the model tensors training changes (or all of them, full=True)
    optimizer.safetensors  the optimizer state's tensors; its structure as JSON in the metadata
    progress.json          step, stage, metrics, learning rates, RNG states, the caller's extra
                           state (data loader position, epoch, losses, run configuration),
                           adapter configuration, versions, and the SHA-256 of the other files

The directory of step N is named ``checkpoint_name(N)`` (``step-00000050``). Nothing is ever
unpickled: only safetensors and JSON are read, and a directory holding any other file is refused.
"""

from __future__ import annotations

import hashlib
import json
import math
import platform
import random
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import NoneType, UnionType
from typing import Any, TypedDict, get_args, get_origin, get_type_hints, is_typeddict

import numpy as np
import safetensors
import torch
from safetensors.torch import save_file
from torch import nn

from .._version import __version__
from ..adapt import adapter_config
from ..adapters import adapter_layers, get_variant
from ..checks import is_number
from .codec import decode, encode, tensor_from_json, tensor_to_json
from .files import sha256, to_json

FORMAT = 1
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
PROGRESS_FILE = "progress.json"
FILES = (MODEL_FILE, OPTIMIZER_FILE, PROGRESS_FILE)
_STEP_NAME = re.compile(r"step-([0-9]+)")


class CheckpointError(Exception):
    """A checkpoint that cannot be written, read or loaded; the message names the file and why."""


class FileRecord(TypedDict):
    """What progress.json records of each other file of its checkpoint."""

    sha256: str
    bytes: int


class Progress(TypedDict):
    """progress.json, format 1: the one schema its writer (``capture``, ``Snapshot.write``) and readers share.

    ``verify`` refuses a progress.json that lacks a field or has one of another type (a number
    is an int or a float, never a bool); fields it does not name are allowed and ignored.
    """

    format: int
    step: int
    stage: str | None
    created: str
    metrics: dict[str, float | None]  # a value that is not a finite number is null (strict JSON)
    lr: list[float] | None
    adapter: dict[str, Any] | None
    run: dict[str, Any]
    model_tensors: str
    rng: dict[str, Any]
    extra: dict[str, Any]
    versions: dict[str, str]
    files: dict[str, FileRecord]
    checksum: str


def checkpoint_name(step: int) -> str:
    """The name of the directory of ``step``'s checkpoint: ``step-`` and the step in 8 digits or more."""
    return f"step-{step:08d}"


def step_of(name: str) -> int | None:
    """The step whose checkpoint a directory named ``name`` is, or None: only ``checkpoint_name(step)`` is one.

    ``step_of("step-00000005") == 5``; ``step-5``, ``step-00000005x`` and ``step-000000005`` are not checkpoints.
    """
    match = _STEP_NAME.fullmatch(name)
    if match is None:
        return None
    step = int(match.group(1))
    return step if name == checkpoint_name(step) else None


def refuse_merged(model: nn.Module) -> None:
    """Check that no adapter of ``model`` is merged, so a checkpoint of it loads as it was saved.

    Raises:
        ValueError: a merged layer (``wb.merge_adapters``): its base weight holds the update, which
            a load into an adapted model would add a second time; names the layers and the fix.
    """
    merged = [name for name, layer in adapter_layers(model) if layer.merged]
    if merged:
        raise ValueError(f"cannot checkpoint a model with merged adapters (layers {', '.join(merged)}): their base "
                         "weights hold the update, so loading would apply it twice; unmerge first: "
                         "wb.unmerge_adapters(model)")


def changed_tensors(model: nn.Module, full: bool = False) -> dict[str, torch.Tensor]:
    """The model's state that training changes, by state-dict name.

    That is every parameter with ``requires_grad``, every tensor an adapter layer owns (LoRA-FA's
    frozen random A too, since the run's result depends on it), the whole state (buffers too,
    such as running statistics) of the modules trained in full (``add_adapters(train=...)``, or
    every module whose parameters all train, as in full fine-tuning), and
    for variants that move base weights (Delta-LoRA) the adapted layers' base weights.
    ``full=True``: the whole state dict.
    """
    state = model.state_dict(keep_vars=True)
    if full:
        return {name: tensor.detach() for name, tensor in state.items()}
    names = {name for name, param in model.named_parameters() if param.requires_grad}
    layers = list(adapter_layers(model))
    config = adapter_config(model) if layers else None
    moves = config is not None and get_variant(config.variant).moves_base_weights
    for trained in config.train if config is not None else ():
        names.update(name for name in state if name.startswith(f"{trained}."))
    for module_name, module in model.named_modules():  # a module that trains (full fine-tuning): its buffers too
        parameters = list(module.parameters(recurse=False))
        if parameters and all(param.requires_grad for param in parameters):
            prefix = f"{module_name}." if module_name else ""
            names.update(f"{prefix}{name}" for name, _ in module.named_buffers(recurse=False))
    for layer_name, layer in layers:
        names.update(f"{layer_name}.{n}" for n, _ in layer.named_parameters() if not n.startswith("base_layer."))
        if moves:
            names.add(f"{layer_name}.base_layer.weight")
    return {name: tensor.detach() for name, tensor in state.items() if name in names}


def capture_rng() -> dict[str, Any]:
    """The global RNG states: Python's, NumPy's and torch's (CPU, and CUDA where present)."""
    version, internal, gauss = random.getstate()
    states: dict[str, Any] = {
        "python": {"version": version, "internal": np.array(internal, dtype=np.uint32), "gauss": gauss},
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng(states: dict[str, Any]) -> None:
    """Set the global RNGs back to ``capture_rng``'s states."""
    python = states["python"]
    random.setstate((python["version"], tuple(int(word) for word in python["internal"]), python["gauss"]))
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def _adapter_summary(model: nn.Module) -> dict[str, Any] | None:
    if not any(True for _ in adapter_layers(model)):
        return None
    config = asdict(adapter_config(model))
    del config["requires_grad"]
    config["targets"] = list(config["targets"])
    config["train"] = list(config["train"])
    return config


def _versions() -> dict[str, str]:
    return {"workbench": __version__, "torch": torch.__version__, "safetensors": safetensors.__version__,
            "numpy": np.__version__, "python": platform.python_version()}


def _progress_checksum(progress: dict[str, Any]) -> str:
    body = {key: value for key, value in progress.items() if key != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


@dataclass
class Snapshot:
    """A checkpoint's content in memory, captured at one instant, not yet serialised."""

    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any] | None
    progress: dict[str, Any]

    def write(self, directory: Path) -> None:
        """Write the checkpoint's files into ``directory``; progress.json records the others' SHA-256."""
        _save_tensors(self.model, directory / MODEL_FILE, {"format": "pt"})
        if self.optimizer is not None:
            tensors: dict[str, torch.Tensor] = {}

            def store(path: str, tensor: torch.Tensor) -> str:
                tensors[path] = tensor
                return path

            structure = json.dumps(encode(self.optimizer, store))
            _save_tensors(tensors, directory / OPTIMIZER_FILE, {"format": "pt", "structure": structure})
        progress = dict(self.progress)
        progress["files"] = _describe([p for p in directory.iterdir()])
        progress["checksum"] = _progress_checksum(progress)
        (directory / PROGRESS_FILE).write_text(to_json(progress) + "\n")


def _describe(files: list[Path]) -> dict[str, dict[str, Any]]:
    """Each file's SHA-256 and size, hashed in parallel (hashlib releases the GIL)."""
    with ThreadPoolExecutor(max_workers=len(files) or 1) as pool:
        digests = dict(zip(files, pool.map(sha256, files), strict=True))
    return {file.name: {"sha256": digests[file], "bytes": file.stat().st_size} for file in files}


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    # Tied parameters appear under several names; safetensors stores each storage once.
    unique: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple[int, tuple[int, ...], tuple[int, ...]], str] = {}
    for name, tensor in tensors.items():
        key = _storage_key(tensor)
        if tensor.numel() and key in seen:
            aliases[name] = seen[key]
        else:
            seen[key] = name
            unique[name] = tensor.contiguous()
    save_file(unique, path, metadata={**metadata, "aliases": json.dumps(aliases)})


def _load_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        with safetensors.safe_open(path, framework="pt") as file:
            metadata = file.metadata() or {}
            tensors = {name: file.get_tensor(name) for name in file.keys()}
    except Exception as error:  # safetensors raises its own error types for malformed files
        raise CheckpointError(f"{path}: not a readable safetensors file ({error})") from None
    for alias, original in json.loads(metadata.get("aliases", "{}")).items():
        tensors[alias] = tensors[original]
    return tensors, metadata


def capture(
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    metrics: dict[str, float] | None = None,
    stage: str | None = None,
    extra: dict[str, Any] | None = None,
    full: bool = False,
    run_config: dict[str, Any] | None = None,
    copy: bool = False,
) -> Snapshot:
    """Everything a checkpoint at ``step`` holds, taken now (RNG states included).

    Args:
        run_config: the run's configuration (task, seed, ...), recorded as it is.
        copy: clone every tensor, so training may go on while the snapshot is written.

    Raises:
        ValueError: an adapter of ``model`` is merged (``refuse_merged``).
    """
    refuse_merged(model)
    metrics = {key: float(value) if math.isfinite(value) else None for key, value in (metrics or {}).items()}
    tensors = changed_tensors(model, full)
    optimizer_state = optimizer.state_dict() if optimizer is not None else None
    if copy:
        tensors = _clone_shared(tensors)
        optimizer_state = _clone_tensors(optimizer_state)
    progress = {
        "format": FORMAT,
        "step": step,
        "stage": stage,
        "created": datetime.now(UTC).isoformat(timespec="milliseconds"),
        "metrics": metrics,
        "lr": [group["lr"] for group in optimizer.param_groups] if optimizer is not None else None,
        "adapter": _adapter_summary(model),
        "run": run_config or {},
        "model_tensors": "full" if full else "trainable",
        "rng": encode(capture_rng(), tensor_to_json),
        "extra": encode(extra or {}, tensor_to_json),
        "versions": _versions(),
    }
    return Snapshot(tensors, optimizer_state, progress)


def _clone_shared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Clones of ``tensors`` in which tied ones (one storage under several names) stay one tensor.

    ``_save_tensors`` stores such aliases once; cloning each name apart would write a tied
    embedding twice (SmolLM2's 113 MiB input and output embedding).
    """
    clones: dict[tuple[int, tuple[int, ...], tuple[int, ...]], torch.Tensor] = {}
    result = {}
    for name, tensor in tensors.items():
        key = _storage_key(tensor)
        if key not in clones or not tensor.numel():
            clones[key] = tensor.detach().clone()
        result[name] = clones[key]
    return result


def _storage_key(tensor: torch.Tensor) -> tuple[int, tuple[int, ...], tuple[int, ...]]:
    """Where a tensor's values are: equal for names tied to the same parameter."""
    return tensor.data_ptr(), tuple(tensor.shape), tuple(tensor.stride())


def _clone_tensors(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {key: _clone_tensors(v) for key, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_clone_tensors(v) for v in value)
    return value


def verify(path: Path) -> dict[str, Any]:
    """The checkpoint's progress (as stored) after checking its structure and every file against its SHA-256.

    A valid checkpoint is a directory named ``checkpoint_name(step)`` for the step its progress.json
    records, holding progress.json (a ``Progress``, checksum intact) and exactly the files it
    describes, model.safetensors among them, each of the recorded size and SHA-256.

    Raises:
        CheckpointError: no such directory, not a checkpoint, a file that should not be there
            (refused: nothing is loaded), a malformed progress.json (a field missing or of the wrong
            type), a name that is not its step's, a missing, undescribed, truncated or corrupted file.
    """
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint")
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint (a checkpoint is a directory)")
    present = {p.name for p in path.iterdir()}
    unexpected = sorted(present - set(FILES))
    if unexpected:
        raise CheckpointError(
            f"{path}: refused, it holds {', '.join(unexpected)}; a checkpoint holds only "
            f"{', '.join(FILES)}, and nothing else is ever loaded"
        )
    if PROGRESS_FILE not in present:
        raise CheckpointError(f"{path}: not a checkpoint ({PROGRESS_FILE} is missing)")
    progress = _read_progress(path / PROGRESS_FILE)
    if step_of(path.name) != progress["step"]:
        raise CheckpointError(f"{path}: its {PROGRESS_FILE} records step {progress['step']}, so it must be named "
                              f"{checkpoint_name(progress['step'])}, not {path.name}")
    _check_files(path, progress["files"], present - {PROGRESS_FILE})
    return progress


def read_progress(path: Path) -> dict[str, Any]:
    """The checkpoint's progress.json, parsed and checked (schema, its own checksum, format); files not hashed.

    For reading what a checkpoint records before loading it (its adapter ranks, to shape a model);
    ``verify`` and ``load_checkpoint`` still check every file.

    Raises:
        CheckpointError: no progress.json, or one that is unreadable, malformed or corrupted.
    """
    if not (path / PROGRESS_FILE).is_file():
        raise CheckpointError(f"{path}: not a checkpoint ({PROGRESS_FILE} is missing)")
    return _read_progress(path / PROGRESS_FILE)


def _read_progress(progress_path: Path) -> dict[str, Any]:
    """progress.json parsed, checked against ``Progress`` and its own checksum."""
    try:
        progress = json.loads(progress_path.read_text())
    except ValueError:  # a UnicodeDecodeError too
        raise CheckpointError(f"{progress_path}: unreadable (truncated or corrupted JSON)") from None
    problem = _schema_problem(progress, Progress)
    if problem is not None:
        raise CheckpointError(f"{progress_path}: malformed, {problem}")
    if progress["checksum"] != _progress_checksum(progress):
        raise CheckpointError(f"{progress_path}: fails its SHA-256 checksum (corrupted)")
    if progress["format"] != FORMAT:
        raise CheckpointError(f"{progress_path}: format {progress['format']}; this version reads format {FORMAT}")
    return progress


def _check_files(path: Path, described: dict[str, FileRecord], present: set[str]) -> None:
    """Check that ``present`` (the files beside progress.json) are exactly the ``described`` ones, intact."""
    for name in described:
        if name not in present:
            raise CheckpointError(f"{path / name}: missing")
    if set(described) != present or MODEL_FILE not in present:
        raise CheckpointError(f"{path}: holds {', '.join(sorted(present)) or 'nothing'} beside {PROGRESS_FILE}, "
                              f"which describes {', '.join(sorted(described)) or 'nothing'}; a checkpoint holds "
                              f"{MODEL_FILE} and exactly the files its {PROGRESS_FILE} describes")
    for name, record in described.items():
        size = (path / name).stat().st_size
        if size != record["bytes"]:
            raise CheckpointError(f"{path / name}: {size} bytes, {record['bytes']} expected (truncated or altered)")
    actual = _describe([path / name for name in described])
    for name, record in described.items():
        if actual[name]["sha256"] != record["sha256"]:
            raise CheckpointError(f"{path / name}: fails its SHA-256 checksum (corrupted)")


def _schema_problem(data: Any, schema: type) -> str | None:
    """What keeps JSON ``data`` from being a ``schema`` (a TypedDict, every field required), or None."""
    if not isinstance(data, dict):
        return f"a JSON object is expected, not {type(data).__name__} {_short(data)}"
    for field, hint in get_type_hints(schema).items():
        if field not in data:
            return f"field {field!r} is missing"
        if not _conforms(data[field], hint):
            return f"field {field!r} must be {_hint_name(hint)}, not {_short(data[field])}"
    return None


def _conforms(value: Any, hint: Any) -> bool:
    """Whether the JSON ``value`` is of the type ``hint``; an int is no bool, a float may be an int."""
    if hint is Any:
        return True
    if isinstance(hint, UnionType):
        return any(_conforms(value, option) for option in get_args(hint))
    if is_typeddict(hint):
        return _schema_problem(value, hint) is None
    if hint is NoneType:
        return value is None
    if hint is float:
        return is_number(value)
    if hint in (int, str):
        return isinstance(value, hint) and not isinstance(value, bool)
    origin, args = get_origin(hint), get_args(hint)
    if origin is list:
        return isinstance(value, list) and all(_conforms(v, args[0]) for v in value)
    if origin is dict:
        key, item = args
        return isinstance(value, dict) and all(_conforms(k, key) and _conforms(v, item) for k, v in value.items())
    raise TypeError(f"the schema uses {hint!r}, which _conforms has no rule for")


def _hint_name(hint: Any) -> str:
    """A type as an error message says it: ``str or null``, ``dict[str, FileRecord]``."""
    if hint is Any:
        return "any value"
    if hint is NoneType:
        return "null"
    if isinstance(hint, UnionType):
        return " or ".join(_hint_name(option) for option in get_args(hint))
    if get_args(hint):
        return f"{get_origin(hint).__name__}[{', '.join(_hint_name(arg) for arg in get_args(hint))}]"
    return hint.__name__


def _short(value: Any, limit: int = 60) -> str:
    """``repr(value)``, cut to ``limit`` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _differences(stored: dict[str, Any] | None, current: dict[str, Any] | None) -> list[str]:
    if stored is None or current is None:
        if stored == current:
            return []
        def describe(config: dict[str, Any] | None) -> str:
            return "no adapters" if config is None else f"{config['variant']} adapters"
        return [f"adapters: checkpoint has {describe(stored)}, model has {describe(current)}"]
    stored = {"train": [], **stored}  # checkpoints written before train= existed trained no module in full
    return [
        f"{key}: checkpoint {stored.get(key)!r}, model {current[key]!r}"
        for key in ("variant", "rank", "alpha", "targets", "options", "train")
        if stored.get(key) != current[key]
    ]


def load_checkpoint(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    restore_random: bool = False,
    verified: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Load the checkpoint at ``path`` into ``model`` (and ``optimizer``); returns its progress.

    Everything is checked before anything is changed: the files' checksums, the adapter
    configuration, every tensor's name and shape, the optimizer state. On any error the model
    and optimizer are as they were.

    Args:
        restore_random: also set the global RNGs to their states at save time (for resuming).
        verified: ``verify(path)``'s result, when the caller has just checked the files.

    Returns:
        The progress dict, with ``rng`` and ``extra`` decoded (tensors restored).

    Raises:
        CheckpointError: what is wrong, naming the file; for another variant, rank or model
            shape, every difference.
    """
    progress = verified if verified is not None else verify(path)
    differences = _differences(progress.get("adapter"), _adapter_summary(model))
    model_path = path / MODEL_FILE
    tensors, _ = _load_tensors(model_path)
    state = model.state_dict(keep_vars=True)
    for name, tensor in tensors.items():
        if name not in state:
            differences.append(f"{name}: in the checkpoint, not in the model")
        elif tuple(tensor.shape) != tuple(state[name].shape):
            shapes = tuple(tensor.shape), tuple(state[name].shape)
            differences.append(f"{name}: shape {shapes[0]} in the checkpoint, {shapes[1]} in the model")
    if differences:
        raise CheckpointError(f"{path}: does not fit this model:\n  " + "\n  ".join(differences))

    if optimizer is not None:
        optimizer_path = path / OPTIMIZER_FILE
        if not optimizer_path.is_file():
            raise CheckpointError(f"{path}: holds no optimizer state ({OPTIMIZER_FILE} is missing)")
        saved, metadata = _load_tensors(optimizer_path)
        optimizer_state = decode(json.loads(metadata["structure"]), saved.__getitem__)
        try:
            optimizer.load_state_dict(optimizer_state)
        except (ValueError, KeyError) as error:
            raise CheckpointError(f"{optimizer_path}: does not fit this optimizer ({error})") from None
    with torch.no_grad():
        for name, tensor in tensors.items():
            state[name].copy_(tensor)
    progress["rng"] = decode(progress["rng"], tensor_from_json)
    progress["extra"] = decode(progress["extra"], tensor_from_json)
    if restore_random:
        restore_rng(progress["rng"])
    progress["path"] = str(path)
    return progress
