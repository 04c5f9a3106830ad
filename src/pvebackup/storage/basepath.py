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

Values are parsed once, when storage.cfg is read (:mod:`.properties`); this
module gets them typed (:meth:`BasePath.from_properties`).

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

from pvebackup.api.errors import StorageUnavailableError
from pvebackup.kit import safefs
from pvebackup.storage.properties import (
    PropertyKind,
    PropertySpec,
    StorageProperties,
    parse_boolean,
    path_problem,
)

__all__ = [
    "BASE_PATH_PROPERTIES",
    "CREATE_SUBDIRS",
    "BasePath",
    "is_mounted",
]

def _mountpoint(value: str) -> bool | Path:
    as_bool = parse_boolean(value)
    if as_bool is not None:
        return as_bool
    problem = path_problem(value)
    if problem is not None:
        raise ValueError(f"must be yes, no or an absolute path: {problem}")
    return Path(value)


BASE_PATH_PROPERTIES: Mapping[str, PropertySpec] = {
    "is_mountpoint": PropertySpec(
        parser=_mountpoint,
        description="yes, or an absolute path, that must be a mount point for the "
        "storage to be used (nothing is created while it is not mounted)",
    ),
    "create-base-path": PropertySpec(
        PropertyKind.BOOL, description="create path when it is missing"
    ),
    "mkdir": PropertySpec(PropertyKind.BOOL, description="deprecated spelling of create-base-path"),
}
"""The properties every storage with a base path understands; add ``create-subdirs``
(:data:`CREATE_SUBDIRS`) where the storage has content subdirectories."""

CREATE_SUBDIRS: Mapping[str, PropertySpec] = {
    "create-subdirs": PropertySpec(
        PropertyKind.BOOL, description="create the content subdirectories (default yes)"
    ),
}


def _flag(props: StorageProperties, name: str) -> bool | None:
    # None when unset (or not declared by this storage type): the defaults depend
    # on the other flags
    return props.flag(name, None) if name in props.specs else None


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
    def from_properties(cls, props: StorageProperties, *, create_default: bool) -> BasePath:
        """From the parsed ``path``, ``is_mountpoint``, ``create-base-path``,
        ``mkdir`` and ``create-subdirs`` (those declared in ``props.specs``).

        :param create_default: ``create-base-path`` when neither it nor ``mkdir``
            is set (Proxmox VE: True; our backup types: False).
        :raises StorageConfigError: no path.
        """
        path = props.path("path")
        mountpoint: Path | None = None
        is_mp = props.get("is_mountpoint")
        if isinstance(is_mp, Path):
            mountpoint = is_mp
        elif is_mp is True:
            mountpoint = path
        mkdir = _flag(props, "mkdir")
        create = _flag(props, "create-base-path")
        if create is None:
            create = mkdir if mkdir is not None else create_default
        subdirs = _flag(props, "create-subdirs")
        return cls(
            storeid=props.storeid,
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
