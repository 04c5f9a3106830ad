"""A storage's base path: whether it may be used, and whether it may be created.

Proxmox VE's directory-backed storages have three properties for this, and we
give them the same meanings (``PVE::Storage::DirPlugin::activate_storage``,
``PVE::Storage::Plugin::config_aware_base_mkdir`` and ``activate_storage``):

- ``is_mountpoint``: ``yes`` (the ``path`` itself) or another absolute path that
  must be a mount point; while nothing is mounted there the storage is unusable,
  and nothing is created (an unmounted backup disk must never fill ``/``);
- ``create-base-path`` (deprecated spelling ``mkdir``, read only when
  ``create-base-path`` is unset): create ``path`` when it is missing;
- ``create-subdirs`` (also off when ``mkdir`` is off): create the content
  subdirectories below ``path`` (``backup/`` for ``backup-dir``).

Booleans are read like ``PVE::JSONSchema::parse_boolean``:
``1/on/yes/true`` and ``0/off/no/false``, any case.

The one difference from Proxmox VE is the default of ``create-base-path`` for
*our* backup types (``backup-dir``, ``backup-store``): off, so a missing path is
refused unless the operator asked for it to be created. For backups a silently
created directory is the failure mode (the disk meant to hold them was not
mounted); the ``dir`` type keeps Proxmox VE's default (on).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from pvebackup.api.errors import StorageConfigError, StorageUnavailableError
from pvebackup.kit import safefs
from pvebackup.storage.plugin import PropertySpec

__all__ = [
    "BASE_PATH_PROPERTIES",
    "CREATE_SUBDIRS",
    "BasePath",
    "is_mounted",
    "parse_boolean",
]

BASE_PATH_PROPERTIES: Mapping[str, PropertySpec] = {
    "is_mountpoint": PropertySpec(
        description="yes, or an absolute path, that must be a mount point for the "
        "storage to be used (nothing is created while it is not mounted)"
    ),
    "create-base-path": PropertySpec(flag=True, description="create path when it is missing"),
    "mkdir": PropertySpec(flag=True, description="deprecated spelling of create-base-path"),
}
"""The properties every storage with a base path understands; add ``create-subdirs``
(:data:`CREATE_SUBDIRS`) where the storage has content subdirectories."""

CREATE_SUBDIRS: Mapping[str, PropertySpec] = {
    "create-subdirs": PropertySpec(
        flag=True, description="create the content subdirectories (default yes)"
    ),
}

_TRUE = frozenset({"1", "on", "yes", "true"})
_FALSE = frozenset({"0", "off", "no", "false"})


def parse_boolean(value: str) -> bool | None:
    """``PVE::JSONSchema::parse_boolean``: True, False, or None for anything else."""
    low = value.strip().lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    return None


def _flag(scfg: Mapping[str, str], storeid: str, key: str) -> bool | None:
    raw = scfg.get(key)
    if raw is None:
        return None
    value = parse_boolean(raw)
    if value is None:
        raise StorageConfigError(f"storage {storeid!r}: {key} must be yes or no, not {raw!r}")
    return value


def _unescape_mountinfo(field: str) -> str:
    # mountinfo writes space, tab, newline and backslash as \040, \011, \012, \134
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 3 < len(field) and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def is_mounted(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` (symlinks resolved, as PVE's ``is_mounted`` does) is a mount point.

    Read from ``/proc/self/mountinfo``, so a bind mount of a directory of the same
    file system counts (``os.path.ismount`` would miss it); without procfs, falls
    back to ``os.path.ismount``.
    """
    try:
        real = os.path.realpath(path, strict=True)
    except OSError:
        return False
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
            lines = f.read().splitlines()
    except OSError:
        return os.path.ismount(real)
    return any(
        len(fields) > 4 and _unescape_mountinfo(fields[4]) == real
        for fields in (line.split(" ") for line in lines)
    )


@dataclass(frozen=True, slots=True)
class BasePath:
    """A storage's ``path`` with its mount and creation rules (see the module doc)."""

    storeid: str
    path: Path
    mountpoint: Path | None = None
    create_base_path: bool = False
    create_subdirs: bool = True

    @classmethod
    def from_scfg(
        cls, scfg: Mapping[str, str], storeid: str, *, create_default: bool
    ) -> BasePath:
        """Parse ``path``, ``is_mountpoint``, ``create-base-path``, ``mkdir``, ``create-subdirs``.

        :param create_default: ``create-base-path`` when neither it nor ``mkdir``
            is set (Proxmox VE: True; our backup types: False).
        :raises StorageConfigError: no path, a relative path or ``is_mountpoint``
            path, or a flag that is no boolean.
        """
        raw = scfg.get("path")
        if not raw:
            raise StorageConfigError(f"storage {storeid!r}: needs 'path'")
        path = Path(raw)
        if not path.is_absolute():
            raise StorageConfigError(f"storage {storeid!r}: path {raw!r} is not absolute")
        mountpoint: Path | None = None
        is_mp = scfg.get("is_mountpoint")
        if is_mp is not None:
            as_bool = parse_boolean(is_mp)
            if as_bool is None:
                if not is_mp.startswith("/"):
                    raise StorageConfigError(
                        f"storage {storeid!r}: is_mountpoint must be yes, no or an absolute"
                        f" path, not {is_mp!r}"
                    )
                mountpoint = Path(is_mp)
            elif as_bool:
                mountpoint = path
        mkdir = _flag(scfg, storeid, "mkdir")
        create = _flag(scfg, storeid, "create-base-path")
        if create is None:
            create = mkdir if mkdir is not None else create_default
        subdirs = _flag(scfg, storeid, "create-subdirs")
        return cls(
            storeid=storeid,
            path=path,
            mountpoint=mountpoint,
            create_base_path=create,
            create_subdirs=(subdirs is not False) and mkdir is not False,
        )

    def activate(self, *, create: bool = False) -> Path:
        """Check that the storage can be used and return its path.

        :param create: the caller is about to write (a backup); the base path is
            created when missing if ``create-base-path`` allows it. Reads never
            create anything.
        :raises StorageUnavailableError: ``is_mountpoint`` is set and nothing is
            mounted there (nothing was created), or the path is missing (and may
            not be created) or is no directory.
        """
        if self.mountpoint is not None and not is_mounted(self.mountpoint):
            raise StorageUnavailableError(
                f"storage {self.storeid!r} is not mounted: {self.mountpoint} must be a mount"
                " point (is_mountpoint) but nothing is mounted there; nothing was created"
            )
        if self.path.is_dir():
            return self.path
        if self.path.exists() or self.path.is_symlink():
            raise StorageUnavailableError(
                f"storage {self.storeid!r}: path {self.path} is not a directory"
            )
        if not (create and self.create_base_path):
            hint = "" if self.create_base_path else " (set create-base-path 1 to create it)"
            raise StorageUnavailableError(
                f"storage {self.storeid!r}: path {self.path} does not exist{hint}"
            )
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageUnavailableError(
                f"storage {self.storeid!r}: cannot create path {self.path}: {exc.strerror}"
            ) from exc
        return self.path

    def subdir(self, name: str, *, create: bool = False) -> Path:
        """The content subdirectory ``name`` of an activated storage.

        Created when missing if ``create`` and ``create-subdirs`` allow it.

        :raises StorageUnavailableError: missing and not to be created, or no directory.
        """
        root = self.activate(create=create)
        sub = root / name
        hint = "" if self.create_subdirs else " (create-subdirs is off)"
        # Opened without following links (kit.safefs): a ``backup`` that is a symlink
        # planted by whoever writes the storage is refused (UnsafeStorageError), so
        # nothing is ever created or written through it.
        try:
            os.close(safefs.open_dir(root, (name,), create=create and self.create_subdirs))
        except (FileNotFoundError, NotADirectoryError) as exc:
            raise StorageUnavailableError(
                f"storage {self.storeid!r}: {sub} is missing or not a directory{hint}"
            ) from exc
        except PermissionError as exc:
            raise StorageUnavailableError(
                f"storage {self.storeid!r}: cannot create {sub}: {exc.strerror}"
            ) from exc
        return sub
        if sub.exists() or sub.is_symlink() or not (create and self.create_subdirs):
            hint = "" if self.create_subdirs else " (create-subdirs is off)"
            raise StorageUnavailableError(
                f"storage {self.storeid!r}: {sub} is missing or not a directory{hint}"
            )
        try:
            sub.mkdir(exist_ok=True)
        except OSError as exc:
            raise StorageUnavailableError(
                f"storage {self.storeid!r}: cannot create {sub}: {exc.strerror}"
            ) from exc
        return sub
