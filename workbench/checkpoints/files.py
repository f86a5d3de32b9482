"""Durable file operations, the project's one atomic writer: files and directories written whole, fsync'd.

Every file the workbench writes (checkpoints, run records, metrics logs, exported adapters,
cached bases) goes through ``write_file`` or ``write_directory``: after a crash at any instant
the target is either as it was or complete. New files get the permissions the umask allows
(0666 & ~umask), as ``open`` would give them, whatever the library that wrote them chose.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

TMP_PREFIX = ".tmp-"
TRASH_PREFIX = ".deleted-"


def sha256(path: Path) -> str:
    """The SHA-256 of a file's bytes, as hex."""
    with open(path, "rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def sha256_once(path: Path) -> str:
    """``sha256(path)``, hashed once per state of the file in this process (its path, size and mtime).

    For inputs read again and again (a model's weights, a task's data): a file that is written
    to changes its size or modification time, so it is hashed again.
    """
    stat = Path(path).stat()
    return _sha256_of(Path(path).resolve(), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=1024)
def _sha256_of(path: Path, size: int, mtime_ns: int) -> str:
    return sha256(path)


def fsync_path(path: Path) -> None:
    """Flush a file's or a directory's data and metadata to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def current_umask() -> int:
    """The process's umask (read without changing it where /proc tells it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)  # elsewhere the only way to read it is to set it, then put it back
    os.umask(mask)
    return mask


def _publish_mode(path: Path) -> None:
    """Give a freshly written file the mode ``open`` would have: 0666 & ~umask (safetensors, mkstemp: 0600)."""
    os.chmod(path, 0o666 & ~current_umask())


def write_file(path: str | os.PathLike[str], write: Callable[[Path], None]) -> Path:
    """Create or replace the file ``path`` atomically: ``write(tmp)`` fills a hidden sibling, then one rename.

    The temporary file is fsync'd and given the umask's permissions before the rename, and the
    parent directory after it, so ``path`` holds the old content or the new one, never a mix.

    Raises:
        OSError: writing failed (full disk, no permission); ``path`` is untouched.
    """
    path = Path(path)
    tmp = path.parent / f"{TMP_PREFIX}{path.name}-{uuid.uuid4().hex[:8]}"
    try:
        write(tmp)
        _publish_mode(tmp)
        fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)
    return path


def write_text(path: str | os.PathLike[str], text: str) -> Path:
    """``write_file`` with ``text`` as the content."""
    return write_file(path, lambda tmp: tmp.write_text(text))


def to_json(data: Any, indent: int | None = 1) -> str:
    """Strict JSON (no NaN or Infinity, which JSON does not have), one value per file.

    Raises:
        ValueError: ``data`` holds a non-finite float, naming it.
    """
    try:
        return json.dumps(data, indent=indent, allow_nan=False)
    except ValueError:
        where = _non_finite(data) or "a value"
        raise ValueError(f"cannot write {where} as JSON: NaN and Infinity are not JSON numbers") from None


def _non_finite(data: Any, path: str = "") -> str | None:
    """Where in ``data`` the first non-finite float is, e.g. ``"settings.lr = nan"``."""
    if isinstance(data, float) and not math.isfinite(data):
        return f"{path or 'the value'} = {data}"
    items = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(data, (list, tuple)) else ()
    for key, value in items:
        found = _non_finite(value, f"{path}.{key}" if path else str(key))
        if found:
            return found
    return None


def write_json(path: str | os.PathLike[str], data: Any) -> Path:
    """``write_text`` of ``data`` as strict, indented JSON with a final newline."""
    return write_text(path, to_json(data) + "\n")


def write_directory(final: Path, fill: Callable[[Path], None]) -> None:
    """Create directory ``final`` atomically: ``fill`` writes the files into a hidden temporary sibling.

    Each file and the directory are fsync'd, then one rename puts it in place and the parent is
    fsync'd. After a crash at any instant ``final`` is either absent or complete. On error the
    temporary directory is removed.

    Raises:
        FileExistsError: ``final`` exists already.
        OSError: writing failed (a full disk, say); nothing of ``final`` exists.
    """
    if final.exists():
        raise FileExistsError(final)
    tmp = final.parent / f"{TMP_PREFIX}{final.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        fill(tmp)
        for file in tmp.iterdir():
            _publish_mode(file)
            fsync_path(file)
        fsync_path(tmp)
        os.rename(tmp, final)  # atomic on POSIX, and never replaces an existing directory
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_path(final.parent)


def remove_directory(path: Path) -> None:
    """Delete ``path`` so that it vanishes at once: renamed to a hidden name first, then removed."""
    trash = path.parent / f"{TRASH_PREFIX}{path.name}-{uuid.uuid4().hex[:8]}"
    os.rename(path, trash)
    fsync_path(path.parent)
    shutil.rmtree(trash)


def set_aside(path: Path, prefix: str) -> Path:
    """Rename ``path`` to a hidden sibling ``<prefix><name>-<8 hex>`` at once (kept, not deleted); returns it."""
    aside = path.parent / f"{prefix}{path.name}-{uuid.uuid4().hex[:8]}"
    os.rename(path, aside)
    fsync_path(path.parent)
    return aside


def remove_strays(directory: Path) -> list[Path]:
    """Remove the temporary and half-deleted directories a crash left behind; returns them."""
    strays = [p for p in directory.iterdir() if p.name.startswith((TMP_PREFIX, TRASH_PREFIX))]
    for path in strays:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return strays
