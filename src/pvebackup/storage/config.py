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
- Yet one bad section never hides the others: reading a node's file
  (:func:`read_storage_config`, ``strict=False``) keeps every good storage usable,
  logs each error, and any use of a broken storage raises its own error (exit 2,
  ``file:line``) instead of "does not exist". Writing such a file is refused, so
  that a broken section is never dropped from it.
- Every property Proxmox VE's plugins declare is known, and so are legacy ones a
  node may still hold (``maxfiles``): those are accepted with a warning
  (:attr:`StorageConfig.warnings`, logged by :func:`read_storage_config`).
- Lenient in one place: a header right after a property (no blank line) starts
  the next section instead of being ignored; writing puts the blank line in.
- Round trip: every line read is remembered with the part of the model it
  belongs to; comments, blank lines and the exact spelling of untouched headers
  and properties are written back as read, so parse -> write of a valid file is
  byte for byte the same. Changed or new properties are written as ``\\tkey value``.
"""

from __future__ import annotations

import logging
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
    StorageUnavailableError,
)
from pvebackup.kit import safefs
from pvebackup.storage import registry
from pvebackup.storage.plugin import StoragePlugin
from pvebackup.storage.properties import (
    NAME_MAX,
    PATH_MAX,
    PATH_RESERVE,
    PropertyKind,
    PropertySpec,
    StorageProperties,
    parse_value,
    path_problem,
)

__all__ = [
    "NAME_MAX",
    "PATH_MAX",
    "PATH_RESERVE",
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

Lookup = Callable[[str], StoragePlugin]

_log = logging.getLogger("pvebackup.storage")


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
    _raw: dict[str, tuple[str, str, int]] = field(default_factory=dict, repr=False)
    """key -> (value, line as read, line number), for the round trip and messages."""
    _comments: dict[str, list[str]] = field(default_factory=dict, repr=False)
    _trailing: list[str] = field(default_factory=list, repr=False)

    _typed: tuple[dict[str, str], StorageProperties] | None = field(default=None, repr=False)
    """The parsed properties, with the strings they were parsed from."""

    def scfg(self) -> dict[str, str]:
        """The storage configuration a plugin gets: ``type`` plus the properties."""
        return {"type": self.type, **self.properties}

    def typed(self, plugin: StoragePlugin) -> StorageProperties:
        """The parsed properties (``plugin``: the plugin of :attr:`type`).

        Parsed when the section was read or added and kept; parsed again only
        after ``properties`` was edited.

        :raises StorageConfigError: an edited value that does not parse.
        """
        if self._typed is None or self._typed[0] != self.properties:
            self._typed = (dict(self.properties), plugin.parse_properties(
                self.scfg(), self.storeid))
        return self._typed[1]

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
        self.broken: dict[str, StorageConfigError] = {}
        """Storages whose section is in error, by id: using one raises its error."""
        self.errors: list[StorageConfigError] = []
        """Every error found while reading (``strict=False``), in file order."""
        self.warnings: list[str] = []
        """``file:line: ...`` notes on legacy properties and types, in file order."""

    def __getitem__(self, storeid: str) -> StorageSection:
        return self._sections[storeid]

    def __iter__(self) -> Iterator[str]:
        return iter(self._sections)

    def __len__(self) -> int:
        return len(self._sections)

    def typed(self, storeid: str) -> StorageProperties:
        """The parsed properties of storage ``storeid`` (see :mod:`.properties`).

        :raises StorageNotFoundError: no such storage.
        :raises StorageConfigError: an edited value that does not parse.
        """
        section = self._sections.get(storeid)
        if section is None:
            raise _not_found(self, storeid)
        return section.typed(self._lookup(section.type))

    def disabled(self, storeid: str) -> bool:
        """Whether storage ``storeid`` has ``disable`` set (to a true value).

        :raises StorageNotFoundError: no such storage.
        """
        props = self.typed(storeid)
        return "disable" in props and props["disable"] is True

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


def _not_found(cfg: StorageConfig, storeid: str) -> StorageConfigError | StorageNotFoundError:
    if storeid in cfg.broken:
        return cfg.broken[storeid]  # it exists, in error: say what, not "no such storage"
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
    path: str, line: int | None, warnings: list[str] | None = None,
) -> str:
    spec = plugin.properties.get(key)
    if spec is not None and spec.deprecated and warnings is not None:
        warnings.append(f"{path}:{line}: storage '{section.storeid}': {spec.deprecated}")
    if spec is None and plugin.open_properties:
        spec = PropertySpec(PropertyKind.BOOL if value is None else PropertyKind.STRING)
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
    # Parsed here, once, so that a bad value is an error naming file:line when the
    # file is read, never a surprise in the middle of a backup.
    parse_value(spec, key, value, section.storeid, path=path, line=line)
    return value


def _check_section(section: StorageSection, lookup: Lookup, path: str) -> None:
    plugin = lookup(section.type)
    for key, value in section.properties.items():
        raw = section._raw.get(key)
        line = raw[2] if raw is not None and raw[0] == value else section.line
        _check_property(plugin, section, key, value, path, line)
    missing = [k for k, spec in plugin.properties.items()
               if spec.required and k not in section.properties]
    if missing:
        raise StorageConfigError(
            f"storage '{section.storeid}' of type '{section.type}' lacks required "
            f"propert{'y' if len(missing) == 1 else 'ies'} {', '.join(missing)}",
            path=path,
            line=section.line,
        )
    section._typed = (dict(section.properties), plugin.parse_properties(
        section.scfg(), section.storeid))


def parse_storage_config(
    text: str, path: str = "storage.cfg", *, lookup: Lookup | None = None,
    strict: bool = True,
) -> StorageConfig:
    """Parse storage.cfg contents.

    :param text: the file contents.
    :param path: the file name used in error messages.
    :param lookup: storage type -> plugin; default the registry's ``lookup``.
    :param strict: raise the first error. ``False``: a section in error is left
        out of the mapping and kept in :attr:`StorageConfig.broken` (using it
        raises its error) and :attr:`StorageConfig.errors`; the others stay usable.
    :raises StorageConfigError: malformed input (``strict``); the message starts
        with ``path:line:`` (see the module docstring for what is refused).
    """
    cfg = StorageConfig(path, lookup)
    pending: list[str] = []  # comment/blank lines not yet attached
    section: StorageSection | None = None
    plugin: StoragePlugin | None = None
    skipping = False  # inside a section in error: its lines up to a blank line go

    def fail(err: StorageConfigError, storeid: str | None) -> None:
        nonlocal section, plugin, skipping
        if strict:
            raise err
        cfg.errors.append(err)
        if storeid is not None and storeid not in cfg.broken:
            cfg.broken[storeid] = err
        if section is not None and cfg._sections.get(section.storeid) is section:
            del cfg._sections[section.storeid]
        section, plugin, skipping = None, None, True
        pending.clear()

    def close() -> None:
        nonlocal section, plugin
        if section is not None:
            section._trailing = pending.copy()
            pending.clear()
            try:
                _check_section(section, cfg._lookup, path)
            except StorageConfigError as err:
                fail(err, section.storeid)
        section, plugin = None, None

    for lineno, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            close()
            skipping = False
            pending.append(raw)
            continue
        if raw.lstrip().startswith("#"):
            if not skipping:
                pending.append(raw)
            continue
        if raw[0].isspace():
            if skipping:
                continue
            m = _PROPERTY.match(raw)
            if section is None or plugin is None or m is None:
                fail(StorageConfigError(
                    f"property line outside a section (a blank line ends a section): "
                    f"{raw.strip()!r}",
                    path=path,
                    line=lineno,
                ), section.storeid if section is not None else None)
                continue
            key, given = m.group(1), m.group(2)
            try:
                if key in section.properties:
                    raise StorageConfigError(
                        f"storage '{section.storeid}': duplicate property '{key}'",
                        path=path,
                        line=lineno,
                    )
                value = _check_property(
                    plugin, section, key, given, path, lineno, cfg.warnings
                )
            except StorageConfigError as err:
                fail(err, section.storeid)
                continue
            section.properties[key] = value
            section._raw[key] = (value, raw, lineno)
            if pending:
                section._comments[key] = pending.copy()
                pending.clear()
            continue
        m = _HEADER.match(raw)
        if m is None:
            fail(StorageConfigError(
                f"expected a section header 'TYPE: ID' or an indented property, "
                f"got {raw.strip()!r}",
                path=path,
                line=lineno,
            ), None)
            continue
        if section is not None:  # header without a blank line: comments go with it
            try:
                _check_section(section, cfg._lookup, path)
            except StorageConfigError as err:
                fail(err, section.storeid)
        skipping = False
        plugin_type, storeid = m.groups()
        try:
            _check_header(cfg, plugin_type, storeid, lineno)
        except StorageConfigError as err:
            # a duplicate id must not make the first, good one unusable
            fail(err, storeid if storeid not in cfg._sections else None)
            continue
        plugin = cfg._lookup(plugin_type)
        legacy = getattr(plugin, "legacy_type", "")
        if legacy:
            cfg.warnings.append(f"{path}:{lineno}: storage '{storeid}': {legacy}")
        section = StorageSection(plugin_type, storeid, line=lineno)
        section.leading, section._header_raw = pending.copy(), raw
        pending.clear()
        cfg._sections[storeid] = section
    close()
    cfg._trailer = pending
    return cfg


def read_storage_config(path: str | os.PathLike[str], *, lookup: Lookup | None = None,
                        strict: bool = False) -> StorageConfig:
    """Read and parse a node's storage.cfg file.

    Not strict by default, as Proxmox VE reads it: one bad section never hides
    the others (see :func:`parse_storage_config`). Its errors and warnings are
    logged (``pvebackup.storage``, level warning) once, here.

    :raises StorageConfigError: it cannot be read or is not UTF-8; with
        ``strict``, also when it is malformed.
    """
    name = os.fspath(path)
    try:
        text = Path(name).read_text(encoding="utf-8")
    except OSError as exc:
        raise StorageConfigError(f"cannot read: {exc.strerror or exc}", path=name) from exc
    except UnicodeDecodeError as exc:
        raise StorageConfigError(f"not UTF-8 text: {exc}", path=name) from exc
    cfg = parse_storage_config(text, name, lookup=lookup, strict=strict)
    for note in cfg.warnings:
        _log.warning("warning: %s", note)
    for err in cfg.errors:
        _log.warning("warning: %s (storage left out)", err)
    return cfg


def write_storage_config(cfg: StorageConfig, path: str | os.PathLike[str]) -> None:
    """Write ``cfg`` atomically (:func:`pvebackup.kit.safefs.atomic_write_path`).

    An existing file keeps its permission bits; a new one gets 0640 (storage.cfg
    may name credentials files).

    :raises StorageConfigError: the file cannot be written (nothing is changed),
        or ``cfg`` was read with sections in error, which writing would drop.
    """
    if cfg.errors:
        raise StorageConfigError(
            f"not written: {len(cfg.errors)} section(s) in error would be lost; "
            f"first: {cfg.errors[0]}",
            path=os.fspath(path),
        )
    try:
        safefs.atomic_write_path(path, cfg.to_text().encode("utf-8"), mode=0o640, keep_mode=True)
    except OSError as exc:
        raise StorageConfigError(
            f"cannot write: {exc.strerror or exc}", path=os.fspath(path)
        ) from exc


def storage_config(
    cfg: StorageConfig, storeid: str, *, allow_disabled: bool = False
) -> dict[str, str]:
    """The scfg of one storage: ``{"type": ..., **properties}`` (a copy).

    Like Proxmox VE's ``storage_check_enabled``, a disabled storage (``disable``)
    is refused: every use goes through here (backup job, restore source and
    target, list, remove, guest volumes), so none of them touches it. Reading and
    writing storage.cfg is not a use: ``cfg`` holds disabled storages as any other.

    :param allow_disabled: return it even when disabled (for code that only
        reads the configuration).
    :raises StorageNotFoundError: no such storage id; the message names the id
        and the ids that exist.
    :raises StorageUnavailableError: the storage is disabled.
    """
    section = cfg.get(storeid)
    if section is None:
        raise _not_found(cfg, storeid)
    if not allow_disabled and cfg.disabled(storeid):
        raise StorageUnavailableError(
            f"storage '{storeid}' is disabled (disable in {cfg.path}); enable it to use it"
        )
    return section.scfg()
