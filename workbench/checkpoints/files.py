"""Durable file operations: write a directory atomically, fsync'd, and hash what is on disk."""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

TMP_PREFIX = ".tmp-"
TRASH_PREFIX = ".deleted-"


def sha256(path: Path) -> str:
    """The SHA-256 of a file's bytes, as hex."""
    with open(path, "rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def fsync_path(path: Path) -> None:
    """Flush a file's or a directory's data and metadata to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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


def remove_strays(directory: Path) -> list[Path]:
    """Remove the temporary and half-deleted directories a crash left behind; returns them."""
    strays = [p for p in directory.iterdir() if p.is_dir() and p.name.startswith((TMP_PREFIX, TRASH_PREFIX))]
    for path in strays:
        shutil.rmtree(path, ignore_errors=True)
    return strays
