"""Typed storage properties: what a storage.cfg value may be, and its parsed value.

A plugin declares each property it accepts as a :class:`PropertySpec` with a
:class:`PropertyKind`. storage.cfg holds strings; this module is the one place
they are turned into values:

- ``bool``: Proxmox VE's ``parse_boolean``: ``1/on/yes/true`` and
  ``0/off/no/false``, any case; written without a value (``shared``) it is ``1``.
- ``int``: decimal digits with an optional ``-``, checked against
  ``minimum``/``maximum``.
- ``size``: bytes, or a number with ``K``/``M``/``G``/``T`` (binary units, see
  :mod:`pvebackup.kit.units`), checked against ``minimum``/``maximum`` (bytes).
- ``enum``: one of ``choices``, exactly as written there.
- ``path``: an absolute path, checked by :func:`path_problem`, parsed to a ``Path``.
- ``string``: anything, as written.

Why one place: each consumer used to read its strings its own way (three
boolean readers that disagreed on the empty string, a size parser taking
``kb``), and a bad value was found in the middle of a backup instead of when
storage.cfg was read. Now :func:`pvebackup.storage.parse_storage_config` parses
every value when it reads the file (errors name ``file:line``), and consumers
ask :class:`StorageProperties` for typed values; they never look at the strings.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import overload

from pvebackup.api.errors import StorageConfigError
from pvebackup.kit.units import format_bytes, parse_size

__all__ = [
    "NAME_MAX",
    "PATH_MAX",
    "PATH_RESERVE",
    "PropertyKind",
    "PropertySpec",
    "PropertyValue",
    "StorageProperties",
    "parse_boolean",
    "parse_properties",
    "parse_value",
    "path_problem",
]

PropertyValue = bool | int | str | Path
"""A parsed property value: ``bool``, ``int`` (int and size), ``str`` (string and
enum), ``Path`` (path), or what a spec's own ``parser`` returns."""

_TRUE = frozenset({"1", "on", "yes", "true"})
_FALSE = frozenset({"0", "off", "no", "false"})
_INT = re.compile(r"-?[0-9]{1,18}")

NAME_MAX = 255
PATH_MAX = 4096
PATH_RESERVE = 1024
"""Bytes below ``PATH_MAX`` kept free for what a provider creates under its path
(``backup/.tmp-lxc-<vmid>-<time>/...``), so that its own names never hit the limit."""


def parse_boolean(value: str) -> bool | None:
    """``PVE::JSONSchema::parse_boolean``: True, False, or None for anything else."""
    low = value.strip().lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    return None


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


class PropertyKind(StrEnum):
    """The type of a storage property's value (see the module doc for each)."""

    STRING = "string"
    BOOL = "bool"
    INT = "int"
    SIZE = "size"
    ENUM = "enum"
    PATH = "path"


@dataclass(frozen=True, slots=True)
class PropertySpec:
    """What a plugin accepts for one storage.cfg property.

    :ivar kind: the value's type; storage.cfg parsing refuses a value that does
        not parse as it (``file:line: storage 'x': property 'y': ...``).
    :ivar required: the section is refused without it.
    :ivar description: one line for people (``pvebackup`` help, docs).
    :ivar default: the value when the property is not set (already parsed:
        ``True``, ``4 << 20``, ``"tar"``); ``None``: no default.
    :ivar choices: the allowed values of an ``enum``.
    :ivar minimum: smallest allowed ``int`` or ``size`` (bytes), inclusive.
    :ivar maximum: largest allowed ``int`` or ``size`` (bytes), inclusive.
    :ivar deprecated: non-empty for a legacy property Proxmox VE once wrote and a
        real node's storage.cfg may still hold (``maxfiles``): accepted, and
        reading the file warns with this text (what to use instead).
    :ivar parser: ``str -> value``, raising ``ValueError`` with the reason:
        replaces the kind's parsing, for a rule no kind has (``chunk-size``: a
        size that is a power of two) or a value no kind describes
        (``is_mountpoint``: a boolean or a path; read such a one with plain
        mapping access, the typed accessors check the kind's type).
    """

    kind: PropertyKind = PropertyKind.STRING
    required: bool = False
    description: str = ""
    default: PropertyValue | None = None
    choices: tuple[str, ...] = ()
    minimum: int | None = None
    maximum: int | None = None
    parser: Callable[[str], PropertyValue] | None = None
    flag: bool = False
    """Whether the kind is ``bool`` (such a property may be written without a
    value, meaning ``1``). ``flag=True`` is the older spelling of ``kind=bool``
    and still accepted; set either, the other follows."""
    deprecated: str = ""

    def __post_init__(self) -> None:
        # PropertySpec(True) was "required" before kind came first: refuse, not guess
        if isinstance(self.kind, bool) or not isinstance(self.kind, str):
            raise TypeError(f"kind must be a PropertyKind, not {self.kind!r}")
        object.__setattr__(self, "kind", PropertyKind(self.kind))  # "bool" -> BOOL
        if self.flag and self.kind is PropertyKind.STRING:
            object.__setattr__(self, "kind", PropertyKind.BOOL)
        elif self.flag is not (self.kind is PropertyKind.BOOL):
            if self.flag:
                raise ValueError(f"flag=True is a bool property, not {self.kind}")
            object.__setattr__(self, "flag", True)
        # Declaration mistakes of a plugin author, found when the class is defined.
        if (self.kind is PropertyKind.ENUM) != bool(self.choices):
            raise ValueError("choices are given exactly for an enum property")
        ranged = self.kind in (PropertyKind.INT, PropertyKind.SIZE)
        if not ranged and (self.minimum is not None or self.maximum is not None):
            raise ValueError("minimum and maximum are for int and size properties")
        if self.default is not None and self.required:
            raise ValueError("a required property has no default")

    def parse(self, value: str) -> PropertyValue:
        """The value of ``value`` (a storage.cfg string) as this property's type.

        :raises ValueError: it is no such value; the message says why, for people
            (the caller adds the storage, the property and ``file:line``).
        """
        if self.parser is not None:
            custom = self.parser(value)
            if isinstance(custom, int) and self.kind in (PropertyKind.INT, PropertyKind.SIZE):
                return self._in_range(custom)
            return custom
        if self.kind is PropertyKind.BOOL:
            parsed = parse_boolean(value)
            if parsed is None:
                raise ValueError(f"must be 0/1, yes/no, on/off or true/false, not {value!r}")
            return parsed
        if self.kind is PropertyKind.INT:
            if _INT.fullmatch(value) is None:
                raise ValueError(f"must be a whole number, not {value[:40]!r}")
            return self._in_range(int(value))
        if self.kind is PropertyKind.SIZE:
            return self._in_range(parse_size(value))
        if self.kind is PropertyKind.ENUM:
            if value not in self.choices:
                raise ValueError(f"must be one of {', '.join(self.choices)}, not {value[:40]!r}")
            return value
        if self.kind is PropertyKind.PATH:
            problem = path_problem(value)
            if problem is not None:
                raise ValueError(problem)
            return Path(value)
        return value

    def _in_range(self, number: int) -> int:
        show: Callable[[int], str] = format_bytes if self.kind is PropertyKind.SIZE else str
        if self.minimum is not None and number < self.minimum:
            raise ValueError(f"must be at least {show(self.minimum)}, not {show(number)}")
        if self.maximum is not None and number > self.maximum:
            raise ValueError(f"must be at most {show(self.maximum)}, not {show(number)}")
        return number


_OPEN = PropertySpec()
"""An undeclared property of an open type: kept as the string written (``1`` for
a flag written without a value)."""


class StorageProperties(Mapping[str, PropertyValue]):
    """The parsed properties of one storage: name -> value, only those set.

    Get typed values with :meth:`flag`, :meth:`number`, :meth:`text`,
    :meth:`path`, :meth:`optional_path`; those apply the spec's ``default`` and
    check that the property has the kind asked for (asking ``flag`` of a size is
    a programming error: ``TypeError``). Plain mapping access gives the parsed
    value of a property that is set.
    """

    def __init__(
        self, storeid: str, specs: Mapping[str, PropertySpec], values: Mapping[str, PropertyValue]
    ) -> None:
        self.storeid = storeid
        self.specs = specs
        self._values = dict(values)

    def __getitem__(self, name: str) -> PropertyValue:
        return self._values[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return f"StorageProperties({self.storeid!r}, {self._values!r})"

    def _get(self, name: str, kinds: tuple[PropertyKind, ...]) -> PropertyValue | None:
        spec = self.specs.get(name)
        if spec is None or spec.kind not in kinds:
            want = " or ".join(kinds)
            have = "undeclared" if spec is None else spec.kind
            raise TypeError(f"property {name!r} is {have}, not {want}")
        value = self._values.get(name)
        return spec.default if value is None else value

    @overload
    def flag(self, name: str) -> bool: ...
    @overload
    def flag(self, name: str, default: None) -> bool | None: ...

    def flag(self, name: str, default: bool | None = False) -> bool | None:
        """A ``bool`` property; unset: the spec's default, else ``default``.

        Pass ``default=None`` to tell "unset" from "set to no".
        """
        value = self._get(name, (PropertyKind.BOOL,))
        if value is None:
            return default
        assert isinstance(value, bool)
        return value

    def number(self, name: str) -> int | None:
        """An ``int`` or ``size`` property (sizes in bytes); unset: the default or None."""
        value = self._get(name, (PropertyKind.INT, PropertyKind.SIZE))
        assert value is None or (isinstance(value, int) and not isinstance(value, bool))
        return value

    def text(self, name: str) -> str | None:
        """A ``string`` or ``enum`` property; unset: the default or None."""
        value = self._get(name, (PropertyKind.STRING, PropertyKind.ENUM))
        assert value is None or isinstance(value, str)
        return value

    def optional_path(self, name: str) -> Path | None:
        """A ``path`` property; unset: None."""
        value = self._get(name, (PropertyKind.PATH,))
        assert value is None or isinstance(value, Path)
        return value

    def path(self, name: str) -> Path:
        """A ``path`` property that must be set (typically ``path``).

        :raises StorageConfigError: it is not set.
        """
        value = self.optional_path(name)
        if value is None:
            raise StorageConfigError(f"storage {self.storeid!r}: needs {name!r}")
        return value


def parse_properties(
    specs: Mapping[str, PropertySpec],
    scfg: Mapping[str, str],
    storeid: str,
    *,
    open_properties: bool = False,
) -> StorageProperties:
    """Parse a storage's ``scfg`` (strings, with ``type``) by ``specs``.

    What a provider calls on the ``scfg`` it was given (the seed passes strings):
    ``parse_properties(MY_PROPERTIES, scfg, storeid)``, or
    ``storage_plugin.parse_properties(scfg, storeid)``. A scfg from a storage.cfg
    that was read has been checked already, so this does not fail for it.

    :param open_properties: keep undeclared properties as strings instead of
        refusing them (see ``StoragePlugin.open_properties``).
    :raises StorageConfigError: an unknown property, a value that does not parse,
        a required property missing; the message names the storage and property.
    """
    values: dict[str, PropertyValue] = {}
    used: dict[str, PropertySpec] = dict(specs)
    for name, raw in scfg.items():
        if name == "type":
            continue
        spec = specs.get(name)
        if spec is None and open_properties:
            spec = used[name] = _OPEN
        if spec is None:
            raise StorageConfigError(f"storage {storeid!r}: unknown property {name!r}")
        values[name] = parse_value(spec, name, raw, storeid)
    missing = [name for name, spec in specs.items() if spec.required and name not in values]
    if missing:
        raise StorageConfigError(
            f"storage {storeid!r}: needs {', '.join(repr(name) for name in missing)}"
        )
    return StorageProperties(storeid, used, values)


def parse_value(
    spec: PropertySpec, name: str, raw: str, storeid: str,
    *, path: str | None = None, line: int | None = None,
) -> PropertyValue:
    """``spec.parse(raw)``, its ``ValueError`` as a :class:`StorageConfigError`.

    :param path: the storage.cfg file, :param line: its line, for the message.
    """
    try:
        return spec.parse(raw)
    except ValueError as exc:
        raise StorageConfigError(
            f"storage {storeid!r}: property {name!r}: {exc}", path=path, line=line
        ) from exc
