"""Read and write Proxmox VE's ``storage.cfg`` (the section-config format).

::

    # comments start with '#'
    dir: local
        path /var/lib/vz
        content images,rootdir
        shared

    backup-dir: backups
        path /srv/backups

A section is a ``TYPE: ID`` header line followed by indented ``key value``
property lines (a tab in files Proxmox VE writes; any whitespace is read); a
property without a value is a flag and means ``"1"``. A blank line ends a
section. Each type's plugin says which properties exist and which are required.

Decisions (see docs/design.md, "Storage layer"):

- Strict where Proxmox VE only warns and skips: unknown types, unknown
  properties, a property outside a section or a malformed line are errors naming
  ``file:line``, so a typo never silently drops a storage.
- Lenient in one place: a header right after a property (no blank line) starts
  the next section instead of being ignored; writing puts the blank line in.
- Round trip: every line read is remembered with the part of the model it
  belongs to; comments, blank lines and the exact spelling of untouched headers
  and properties are written back as read, so parse -> write of a valid file is
  byte for byte the same. Changed or new properties are written as ``\\tkey value``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from pvebackup.api.errors import (
    PluginError,
    PluginNotFoundError,
    StorageConfigError,
    StorageNotFoundError,
)
from pvebackup.kit import safefs
from pvebackup.storage import registry
from pvebackup.storage.plugin import PropertySpec, StoragePlugin

__all__ = [
    "StorageConfig",
    "StorageSection",
    "parse_storage_config",
    "path_problem",
    "read_storage_config",
    "storage_config",
    "valid_storeid",
    "write_storage_config",
]

# The patterns Proxmox VE's SectionConfig and pve-storage-id use.
_HEADER = re.compile(r"^(\S+):\s*(\S+)\s*$")
_PROPERTY = re.compile(r"^\s+(\S+)(?:\s+(.*\S))?\s*$")
_STOREID = re.compile(r"^[a-z][a-z0-9\-_.]*[a-z0-9]$", re.IGNORECASE)
_FLAG_VALUES = frozenset({"0", "1", "yes", "no", "on", "off", "true", "false"})

Lookup = Callable[[str], StoragePlugin]


def valid_storeid(storeid: str) -> bool:
    """Whether ``storeid`` is a valid storage id (``[a-z][a-z0-9._-]*[a-z0-9]``, any case)."""
    return _STOREID.match(storeid) is not None


@dataclass(eq=False)
class StorageSection:
    """One storage: its ``type``, ``storeid`` and properties (all values strings).

    Edit ``properties`` freely; the layout fields only serve a faithful round trip.
    """

    type: str
    storeid: str
    properties: dict[str, str] = field(default_factory=dict)
    line: int | None = None
    """Line of the header in the file it was read from (None if made in code)."""
    leading: list[str] = field(default_factory=list, repr=False)
    _header_raw: str | None = field(default=None, repr=False)
    _raw: dict[str, tuple[str, str]] = field(default_factory=dict, repr=False)
    _comments: dict[str, list[str]] = field(default_factory=dict, repr=False)
    _trailing: list[str] = field(default_factory=list, repr=False)

    def scfg(self) -> dict[str, str]:
        """The storage configuration a plugin gets: ``type`` plus the properties."""
        return {"type": self.type, **self.properties}

    def _lines(self, lookup: Lookup | None) -> list[str]:
        header = self._header_raw
        m = _HEADER.match(header) if header is not None else None
        if header is None or m is None or m.groups() != (self.type, self.storeid):
            header = f"{self.type}: {self.storeid}"
        lines = [header]
        flags = _flag_names(lookup, self.type)
        for key, value in self.properties.items():
            lines.extend(self._comments.get(key, ()))
            raw = self._raw.get(key)
            if raw is not None and raw[0] == value:
                lines.append(raw[1])
            elif value == "1" and key in flags:
                lines.append(f"\t{key}")
            else:
                lines.append(f"\t{key} {value}")
        for key, comments in self._comments.items():
            if key not in self.properties:  # the property was removed, its notes stay
                lines.extend(comments)
        lines.extend(self._trailing)
        return lines


def _flag_names(lookup: Lookup | None, plugin_type: str) -> frozenset[str]:
    if lookup is None:
        return frozenset()
    try:
        plugin = lookup(plugin_type)
    except (PluginError, PluginNotFoundError):
        return frozenset()
    return frozenset(k for k, spec in plugin.properties.items() if spec.flag)


class StorageConfig(Mapping[str, StorageSection]):
    """The parsed storage.cfg: a mapping storeid -> :class:`StorageSection`, in file order."""

    def __init__(self, path: str = "storage.cfg", lookup: Lookup | None = None) -> None:
        self.path = path
        self._sections: dict[str, StorageSection] = {}
        self._trailer: list[str] = []
        self._lookup: Lookup = lookup if lookup is not None else registry.lookup

    def __getitem__(self, storeid: str) -> StorageSection:
        return self._sections[storeid]

    def __iter__(self) -> Iterator[str]:
        return iter(self._sections)

    def __len__(self) -> int:
        return len(self._sections)

    def add(
        self, plugin_type: str, storeid: str, properties: Mapping[str, str] | None = None
    ) -> StorageSection:
        """Append a new storage after checking it like a parsed one.

        :raises StorageConfigError: invalid id, duplicate id, unknown type or
            property, missing required property.
        """
        section = StorageSection(plugin_type, storeid, dict(properties or {}))
        _check_header(self, plugin_type, storeid, None)
        _check_section(section, self._lookup, self.path)
        self._sections[storeid] = section
        return section

    def remove(self, storeid: str) -> None:
        """Remove a storage; its leading comments go with it.

        :raises StorageNotFoundError: no such storage.
        """
        if storeid not in self._sections:
            raise _not_found(self, storeid)
        del self._sections[storeid]

    def to_text(self) -> str:
        """The file contents: byte for byte what was read, plus any edits."""
        out: list[str] = []
        for section in self._sections.values():
            leading = section.leading
            if out and not any(not line.strip() for line in leading):
                leading = ["", *leading]  # a blank line must end the previous section
            out.extend(leading)
            out.extend(section._lines(self._lookup))
        out.extend(self._trailer)
        return "".join(line + "\n" for line in out)


def _not_found(cfg: StorageConfig, storeid: str) -> StorageNotFoundError:
    known = ", ".join(cfg) or "none"
    return StorageNotFoundError(
        f"storage '{storeid}' does not exist in {cfg.path}; storages: {known}"
    )


def _check_header(cfg: StorageConfig, plugin_type: str, storeid: str, line: int | None) -> None:
    if not valid_storeid(storeid):
        raise StorageConfigError(
            f"invalid storage id '{storeid}': it must start with a letter, end with a "
            "letter or digit and contain only letters, digits, '-', '_' and '.'",
            path=cfg.path,
            line=line,
        )
    if storeid in cfg._sections:
        first = cfg._sections[storeid].line
        where = f" (first defined on line {first})" if first is not None else ""
        raise StorageConfigError(
            f"duplicate storage id '{storeid}'{where}", path=cfg.path, line=line
        )
    try:
        cfg._lookup(plugin_type)
    except (PluginError, PluginNotFoundError) as exc:  # unknown, or refused
        raise StorageConfigError(
            f"storage '{storeid}': unsupported type '{plugin_type}': {exc}",
            path=cfg.path,
            line=line,
        ) from exc


def _check_property(
    plugin: StoragePlugin, section: StorageSection, key: str, value: str | None,
    path: str, line: int | None,
) -> str:
    spec = plugin.properties.get(key)
    if spec is None and plugin.open_properties:
        spec = PropertySpec(flag=value is None)
    if spec is None:
        known = ", ".join(sorted(plugin.properties))
        raise StorageConfigError(
            f"storage '{section.storeid}': unknown property '{key}' for type "
            f"'{section.type}'; known: {known}",
            path=path,
            line=line,
        )
    if value is None:
        if not spec.flag:
            raise StorageConfigError(
                f"storage '{section.storeid}': property '{key}' needs a value",
                path=path,
                line=line,
            )
        return "1"
    if spec.path:
        problem = path_problem(value)
        if problem is not None:
            raise StorageConfigError(
                f"storage '{section.storeid}': property '{key}': {problem}", path=path, line=line
            )
    if spec.flag and value.lower() not in _FLAG_VALUES:
        raise StorageConfigError(
            f"storage '{section.storeid}': flag '{key}' must be 0 or 1, not '{value}'",
            path=path,
            line=line,
        )
    return value


NAME_MAX = 255
PATH_MAX = 4096
PATH_RESERVE = 1024
"""Bytes below ``PATH_MAX`` kept free for what a provider creates under its path
(``backup/.tmp-lxc-<vmid>-<time>/...``), so that its own names never hit the limit."""


def path_problem(value: str) -> str | None:
    """Why ``value`` is no usable storage path, or ``None`` when it is one.

    Checked when storage.cfg is read, so that an over-long path is one clear
    ``StorageConfigError`` naming the line instead of ``ENAMETOOLONG`` deep inside
    a backup (or a traceback in ``list``).
    """
    if not value.startswith("/"):
        return f"{value[:80]!r} is not an absolute path"
    if "\0" in value:
        return "a path cannot contain a NUL byte"
    raw = value.encode("utf-8", "surrogateescape")
    if len(raw) > PATH_MAX - 1 - PATH_RESERVE:
        return f"path of {len(raw)} bytes is too long (at most {PATH_MAX - 1 - PATH_RESERVE})"
    for part in raw.split(b"/"):
        if len(part) > NAME_MAX:
            return f"path component of {len(part)} bytes is longer than NAME_MAX ({NAME_MAX})"
    return None


def _check_section(section: StorageSection, lookup: Lookup, path: str) -> None:
    plugin = lookup(section.type)
    for key, value in section.properties.items():
        _check_property(plugin, section, key, value, path, section.line)
    missing = [k for k, spec in plugin.properties.items()
               if spec.required and k not in section.properties]
    if missing:
        raise StorageConfigError(
            f"storage '{section.storeid}' of type '{section.type}' lacks required "
            f"propert{'y' if len(missing) == 1 else 'ies'} {', '.join(missing)}",
            path=path,
            line=section.line,
        )


def parse_storage_config(
    text: str, path: str = "storage.cfg", *, lookup: Lookup | None = None
) -> StorageConfig:
    """Parse storage.cfg contents.

    :param text: the file contents.
    :param path: the file name used in error messages.
    :param lookup: storage type -> plugin; default the registry's ``lookup``.
    :raises StorageConfigError: malformed input; the message starts with
        ``path:line:`` (see the module docstring for what is refused).
    """
    cfg = StorageConfig(path, lookup)
    pending: list[str] = []  # comment/blank lines not yet attached
    section: StorageSection | None = None
    plugin: StoragePlugin | None = None

    def close() -> None:
        nonlocal section, plugin
        if section is not None:
            section._trailing = pending.copy()
            pending.clear()
            _check_section(section, cfg._lookup, path)
        section, plugin = None, None

    for lineno, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            close()
            pending.append(raw)
            continue
        if raw.lstrip().startswith("#"):
            pending.append(raw)
            continue
        if raw[0].isspace():
            m = _PROPERTY.match(raw)
            if section is None or plugin is None or m is None:
                raise StorageConfigError(
                    f"property line outside a section (a blank line ends a section): "
                    f"{raw.strip()!r}",
                    path=path,
                    line=lineno,
                )
            key, given = m.group(1), m.group(2)
            if key in section.properties:
                raise StorageConfigError(
                    f"storage '{section.storeid}': duplicate property '{key}'",
                    path=path,
                    line=lineno,
                )
            value = _check_property(plugin, section, key, given, path, lineno)
            section.properties[key] = value
            section._raw[key] = (value, raw)
            if pending:
                section._comments[key] = pending.copy()
                pending.clear()
            continue
        m = _HEADER.match(raw)
        if m is None:
            raise StorageConfigError(
                f"expected a section header 'TYPE: ID' or an indented property, "
                f"got {raw.strip()!r}",
                path=path,
                line=lineno,
            )
        if section is not None:  # header without a blank line: comments go with it
            _check_section(section, cfg._lookup, path)
        plugin_type, storeid = m.groups()
        _check_header(cfg, plugin_type, storeid, lineno)
        plugin = cfg._lookup(plugin_type)
        section = StorageSection(plugin_type, storeid, line=lineno)
        section.leading, section._header_raw = pending.copy(), raw
        pending.clear()
        cfg._sections[storeid] = section
    close()
    cfg._trailer = pending
    return cfg


def read_storage_config(path: str | os.PathLike[str], *, lookup: Lookup | None = None
                        ) -> StorageConfig:
    """Read and parse a storage.cfg file.

    :raises StorageConfigError: it cannot be read, is not UTF-8 or is malformed.
    """
    name = os.fspath(path)
    try:
        text = Path(name).read_text(encoding="utf-8")
    except OSError as exc:
        raise StorageConfigError(f"cannot read: {exc.strerror or exc}", path=name) from exc
    except UnicodeDecodeError as exc:
        raise StorageConfigError(f"not UTF-8 text: {exc}", path=name) from exc
    return parse_storage_config(text, name, lookup=lookup)


def write_storage_config(cfg: StorageConfig, path: str | os.PathLike[str]) -> None:
    """Write ``cfg`` atomically (:func:`pvebackup.kit.safefs.atomic_write_path`).

    An existing file keeps its permission bits; a new one gets 0640 (storage.cfg
    may name credentials files).

    :raises StorageConfigError: the file cannot be written (nothing is changed).
    """
    try:
        safefs.atomic_write_path(path, cfg.to_text().encode("utf-8"), mode=0o640, keep_mode=True)
    except OSError as exc:
        raise StorageConfigError(
            f"cannot write: {exc.strerror or exc}", path=os.fspath(path)
        ) from exc


def storage_config(cfg: StorageConfig, storeid: str) -> dict[str, str]:
    """The scfg of one storage: ``{"type": ..., **properties}`` (a copy).

    :raises StorageNotFoundError: no such storage id; the message names the id
        and the ids that exist.
    """
    section = cfg.get(storeid)
    if section is None:
        raise _not_found(cfg, storeid)
    return section.scfg()
