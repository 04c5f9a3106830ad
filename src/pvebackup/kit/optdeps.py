"""Optional Python dependencies, imported only where they are used.

The Debian package (``make deb``) runs on Debian's ``python3`` with Debian's
packages: ``rich`` (progress bars on a terminal) and ``boto3`` (S3 stores) are
Recommends, and ``pyfastcdc`` (container archives in a backup-store) is in no
Debian release. So none of them is imported at start: a command that does not
need one runs without it, and one that does fails with a typed error that says
what to install (``docs/proxmox-ve.md``, "Python dependencies").

:data:`PRIVATE_DIR` is where the documented ``pip install --target`` step puts
what Debian does not have; it is searched after ``sys.path`` (never before: a
Debian or venv copy wins), and only when the normal import fails.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from types import ModuleType

from pvebackup.api.errors import UnsupportedError

__all__ = ["PRIVATE_DIR", "available", "require"]

PRIVATE_DIR = "/usr/lib/pvebackup/python"
"""Root-owned directory for pip-installed dependencies Debian does not package."""

_HINTS = {
    "rich": "apt-get install python3-rich",
    "boto3": "apt-get install python3-boto3",
    "botocore": "apt-get install python3-boto3",
    "pyfastcdc": f"python3 -m pip install --target {PRIVATE_DIR} pyfastcdc==0.3.1",
}


def _with_private_dir() -> bool:
    """Appends :data:`PRIVATE_DIR` to ``sys.path`` if it exists; True if it was added."""
    if PRIVATE_DIR in sys.path or not os.path.isdir(PRIVATE_DIR):
        return False
    sys.path.append(PRIVATE_DIR)
    importlib.invalidate_caches()
    return True


def available(name: str) -> bool:
    """Whether ``import name`` would find the module (without importing it)."""
    try:
        if importlib.util.find_spec(name) is not None:
            return True
    except (ImportError, ValueError):  # a module set to None in sys.modules
        return False
    return _with_private_dir() and importlib.util.find_spec(name) is not None


def require(name: str, purpose: str) -> ModuleType:
    """``import name``, or :class:`UnsupportedError` saying what needs it and the fix."""
    try:
        return importlib.import_module(name)
    except ImportError as first:
        if _with_private_dir():
            try:
                return importlib.import_module(name)
            except ImportError:
                pass
        hint = _HINTS.get(name.split(".")[0], f"install the Python module {name}")
        raise UnsupportedError(
            f"{purpose} needs the Python module {name!r}, which is not installed: {hint}"
        ) from first
