"""Partition tables (MBR, GPT) and file system signatures, read from a guest's disk.

Every byte here comes from the guest's disk inside a backup: hostile input. The
parsers read through a ``read(offset, length)`` callable, never more than
:data:`MAX_READ` bytes at once, follow at most :data:`MAX_LOGICAL` extended boot
records (a loop of EBRs ends there), accept at most :data:`MAX_GPT_ENTRIES` GPT
entries, and drop every partition that does not lie inside the disk. What they
cannot make sense of is "no partition table": the whole disk is then the file
system candidate.
"""

from __future__ import annotations

import struct
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from pvebackup.api.errors import UsageError

__all__ = [
    "MAX_GPT_ENTRIES",
    "MAX_LOGICAL",
    "Partition",
    "detect_filesystem",
    "pick_partition",
    "read_partitions",
]

Reader = Callable[[int, int], bytes]
"""``read(offset, length)``: at most ``length`` bytes of the disk at ``offset``."""

SECTOR = 512
MAX_READ = 1 << 20
MAX_LOGICAL = 128
"""Most logical partitions followed in an MBR extended partition chain."""
MAX_GPT_ENTRIES = 1024
"""GPT entries read at most (the specification's minimum array holds 128)."""

_MBR_ENTRY = struct.Struct("<B3sB3sII")
_EXTENDED = frozenset({0x05, 0x0F, 0x85})
_PROTECTIVE = 0xEE
_LINUX_MBR = frozenset({0x83})
_GPT_HEADER = struct.Struct("<8sIIIIQQQQ16sQIII")
_GPT_ENTRY = struct.Struct("<16s16sQQQ72s")
# Linux file system data, and the discoverable root/usr partitions of common architectures.
_LINUX_GPT = frozenset(
    uuid.UUID(u)
    for u in (
        "0fc63daf-8483-4772-8e79-3d69d8477de4",  # Linux filesystem data
        "4f68bce3-e8cd-4db1-96e7-fbcaf984b709",  # root x86-64
        "44479540-f297-41b2-9af7-d131d5f0458a",  # root x86
        "b921b045-1df0-41c3-af44-4c6f280d3fae",  # root arm64
        "8484680c-9521-48c6-9c11-b0720656f69e",  # usr x86-64
        "933ac7e1-2eb4-4f13-b844-0e14e2aef915",  # /home
        "3b8f8425-20e0-4f3b-907f-1a25a76f98e8",  # /srv
    )
)


@dataclass(frozen=True, slots=True)
class Partition:
    """One partition (``number`` 0 is the whole disk without a partition table)."""

    number: int
    offset: int
    size: int
    type: str
    """MBR type as ``0x83``, or the GPT type GUID."""
    linux: bool


def _read(read: Reader, offset: int, length: int) -> bytes:
    data = read(offset, min(length, MAX_READ))
    return data if len(data) == length else b""


def read_partitions(read: Reader, disk_size: int) -> list[Partition]:
    """The partitions of a disk, by number; empty when it has no table we know."""
    mbr = _read(read, 0, SECTOR)
    if len(mbr) != SECTOR or mbr[510:512] != b"\x55\xaa":
        return []
    entries = [_MBR_ENTRY.unpack_from(mbr, 446 + 16 * i) for i in range(4)]
    if any(e[2] == _PROTECTIVE for e in entries):
        gpt = _read_gpt(read, disk_size)
        if gpt is not None:
            return gpt
    found: list[Partition] = []
    for i, (_status, _chs, ptype, _chs2, lba, count) in enumerate(entries, start=1):
        if ptype in (0, _PROTECTIVE) or count == 0:
            continue  # unused, or the GPT's placeholder (when the GPT was unusable)
        if ptype in _EXTENDED:
            found.extend(_read_logical(read, disk_size, lba))
            continue
        part = _checked(i, lba, count, f"0x{ptype:02x}", ptype in _LINUX_MBR, disk_size)
        if part is not None:
            found.append(part)
    return sorted(found, key=lambda p: p.number)


def _checked(
    number: int, lba: int, count: int, ptype: str, linux: bool, disk_size: int
) -> Partition | None:
    offset, size = lba * SECTOR, count * SECTOR
    # A partition reaching past the disk (or starting at 0, over the table itself)
    # is hostile or damaged: it is not offered.
    if lba == 0 or size == 0 or offset + size > disk_size:
        return None
    return Partition(number, offset, size, ptype, linux)


def _read_logical(read: Reader, disk_size: int, ext_lba: int) -> list[Partition]:
    found: list[Partition] = []
    seen: set[int] = set()
    ebr_lba = ext_lba
    number = 5
    # Threat: an EBR chain that loops or never ends; bounded by count and by a seen set.
    while ebr_lba not in seen and len(seen) < MAX_LOGICAL:
        seen.add(ebr_lba)
        ebr = _read(read, ebr_lba * SECTOR, SECTOR) if ebr_lba * SECTOR < disk_size else b""
        if len(ebr) != SECTOR or ebr[510:512] != b"\x55\xaa":
            break
        first = _MBR_ENTRY.unpack_from(ebr, 446)
        nxt = _MBR_ENTRY.unpack_from(ebr, 462)
        if first[2] != 0 and first[5] != 0:
            part = _checked(
                number, ebr_lba + first[4], first[5], f"0x{first[2]:02x}",
                first[2] in _LINUX_MBR, disk_size,
            )  # fmt: skip
            if part is not None:
                found.append(part)
            number += 1
        if nxt[2] not in _EXTENDED or nxt[4] == 0:
            break
        ebr_lba = ext_lba + nxt[4]
    return found


def _read_gpt(read: Reader, disk_size: int) -> list[Partition] | None:
    header = _read(read, SECTOR, _GPT_HEADER.size)
    if len(header) != _GPT_HEADER.size:
        return None
    (sig, _rev, _hsize, _crc, _res, _cur, _alt, _first, _last, _guid, entries_lba,
     count, entry_size, _acrc) = _GPT_HEADER.unpack(header)  # fmt: skip
    if sig != b"EFI PART":
        return None
    # Threat: a header claiming 2^32 entries of 4 GiB each; bounded before reading.
    if not 0 < count <= MAX_GPT_ENTRIES or not 128 <= entry_size <= 4096 or entry_size % 8:
        return None
    table = _read(read, entries_lba * SECTOR, count * entry_size)
    if not table:
        return None
    found: list[Partition] = []
    for i in range(count):
        ptype, _unique, first, last, _attrs, _name = _GPT_ENTRY.unpack_from(table, i * entry_size)
        if ptype == bytes(16) or last < first:
            continue
        guid = uuid.UUID(bytes_le=ptype)
        part = _checked(i + 1, first, last - first + 1, str(guid), guid in _LINUX_GPT, disk_size)
        if part is not None:
            found.append(part)
    return found


# (offset, magic, name): the signatures of file systems a guest disk may hold.
_SIGNATURES: tuple[tuple[int, bytes, str], ...] = (
    (1024 + 56, b"\x53\xef", "ext"),
    (0, b"XFSB", "xfs"),
    (0x10040, b"_BHRfS_M", "btrfs"),
    (4086, b"SWAPSPACE2", "swap"),
    (3, b"NTFS    ", "ntfs"),
    (82, b"FAT32   ", "vfat"),
    (54, b"FAT16   ", "vfat"),
    (54, b"FAT12   ", "vfat"),
    (512 + 0, b"LABELONE", "LVM2_member"),
)


def detect_filesystem(read: Reader, size: int) -> str | None:
    """The file system type whose signature the first bytes of a partition carry."""
    for offset, magic, name in _SIGNATURES:
        if offset + len(magic) > size:
            continue
        if _read(read, offset, len(magic)) == magic:
            return name
    return None


def pick_partition(parts: list[Partition], number: int | None) -> Partition | None:
    """The partition ``--partition`` names, else the first Linux one, else the first.

    None means "the whole disk" (no table). :raises UsageError: no such partition.
    """
    if number is not None:
        for part in parts:
            if part.number == number:
                return part
        have = ", ".join(str(p.number) for p in parts) or "none"
        raise UsageError(f"the disk has no partition {number} (partitions: {have})")
    if not parts:
        return None
    for part in parts:
        if part.linux:
            return part
    return parts[0]
