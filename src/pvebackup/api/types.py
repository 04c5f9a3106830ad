"""Typed values of the backup provider API.

The seed passes plain strings and Perl lists; here each has a type that still
compares equal to the seed's string (``StrEnum``) or list shape (``NamedTuple``),
so a provider written against the seed's words keeps working.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import TypedDict

__all__ = [
    "BackupMechanism",
    "BitmapMode",
    "DeviceInfo",
    "DeviceInfoEntry",
    "GuestType",
    "IdMapEntry",
    "LogFunction",
    "LogLevel",
    "RestoreMechanism",
    "SeedIdMap",
    "SeedIdMapEntry",
]


class GuestType(StrEnum):
    """Type of a guest: ``qemu`` (a VM) or ``lxc`` (a container)."""

    QEMU = "qemu"
    LXC = "lxc"


class BackupMechanism(StrEnum):
    """How the host hands a guest's data to the provider.

    ``nbd`` (VMs): each disk is an NBD export of an unchanging copy; the provider's
    ``backup_nbd`` is called per disk. ``directory`` (containers): the provider's
    ``backup_directory`` gets a directory with an unchanging copy of the filesystem.
    """

    NBD = "nbd"
    DIRECTORY = "directory"


class RestoreMechanism(StrEnum):
    """How the provider hands a backup back to the host.

    ``qemu-img`` (VMs): per disk a path or URI ``qemu-img convert`` can read.
    ``tar`` (containers): a (possibly compressed) tar archive of the filesystem.
    ``directory`` (containers): a directory holding the full filesystem.
    """

    QEMU_IMG = "qemu-img"
    TAR = "tar"
    DIRECTORY = "directory"


class BitmapMode(StrEnum):
    """What the host did with the dirty bitmap the provider asked for.

    ``none``: no bitmap is used, the export holds the whole disk.
    ``new``: a bitmap was newly created (first backup with this id, or the old one
    was inconsistent); the export holds the whole disk and the bitmap starts here.
    ``reuse``: the bitmap with the requested id existed; only its dirty extents
    (changes since the last successful backup with this id) can be read.
    """

    NONE = "none"
    NEW = "new"
    REUSE = "reuse"


class LogLevel(StrEnum):
    """Levels of ``log_function(level, message)``, exactly the seed's three."""

    INFO = "info"
    WARN = "warn"
    ERR = "err"


LogFunction = Callable[[str, str], None]
"""``log_function(level, message)``: write one line to the backup task log.

``level`` is ``"info"``, ``"warn"`` or ``"err"`` (a :class:`LogLevel` is a ``str``);
``message`` is one line of text meant for a person. Never pass key material.
"""


@dataclass(frozen=True, slots=True)
class IdMapEntry:
    """One uid or gid mapping of a container, as ``lxc.idmap`` states it.

    The typed helper for the seed's ``["u", "0", "100000", "65536"]`` (what a
    provider receives, :data:`SeedIdMapEntry`): the same four fields in the same
    order, with numbers as ``int``. ``from_seed()`` parses the seed's form,
    ``as_list()`` gives it back:

    - ``kind``: ``"u"`` for a user mapping, ``"g"`` for a group mapping;
    - ``ct_start``: the first id inside the container's user namespace;
    - ``host_start``: that id as seen on the host;
    - ``count``: how many consecutive ids are mapped.
    """

    kind: str
    ct_start: int
    host_start: int
    count: int

    def __post_init__(self) -> None:
        if self.kind not in ("u", "g"):
            raise ValueError(f"id map kind must be 'u' or 'g', not {self.kind!r}")
        if self.ct_start < 0 or self.host_start < 0 or self.count <= 0:
            raise ValueError(f"invalid id map range {self.as_list()}")

    def as_list(self) -> list[str]:
        """The seed's form: ``["u", "0", "100000", "65536"]``."""
        return [self.kind, str(self.ct_start), str(self.host_start), str(self.count)]

    @classmethod
    def from_seed(cls, entry: IdMapEntry | Sequence[str]) -> IdMapEntry:
        """Parse one entry of the seed's form, ``["u", "0", "100000", "65536"]``.

        An :class:`IdMapEntry` is returned as it is. Numbers must be decimal
        strings (or ints); anything else raises ``ValueError`` naming the entry.
        """
        if isinstance(entry, IdMapEntry):
            return entry
        if isinstance(entry, str | bytes) or len(entry) != 4:
            raise ValueError(f"id map entry must be 4 fields [kind, ct, host, count]: {entry!r}")
        kind, *numbers = entry
        values: list[int] = []
        for n in numbers:
            if isinstance(n, bool) or not isinstance(n, str | int):
                raise ValueError(f"id map entry {entry!r}: {n!r} is not a number")
            if isinstance(n, str) and not (n.isascii() and n.isdigit()):
                raise ValueError(f"id map entry {entry!r}: {n!r} is not a decimal number")
            values.append(int(n))
        return cls(str(kind), values[0], values[1], values[2])


SeedIdMapEntry = list[str]
"""One id map entry as the seed passes it: ``["u", "0", "100000", "65536"]``.

Four strings: kind (``u``/``g``), first container id, first host id, count. A
provider can unpack it (``kind, ct, host, count = entry``) or index it; to
compute with it, wrap it: ``IdMapEntry.from_seed(entry)`` or ``IdMapper(id_map)``.
"""

SeedIdMap = list[SeedIdMapEntry]
"""The ``id_map`` argument of ``backup_directory``: a list of :data:`SeedIdMapEntry`."""


class DeviceInfoEntry(TypedDict):
    """Information about one disk in a VM backup: its ``size`` in bytes."""

    size: int


DeviceInfo = dict[str, DeviceInfoEntry]
"""``{devicename: {"size": bytes}}``, returned by ``restore_qemu_get_device_info``."""
