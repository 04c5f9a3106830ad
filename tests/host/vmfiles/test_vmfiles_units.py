"""vm-files units: partition tables, the debugfs listing parser, the extractor.

Every input is built here as a forger would: tables that loop or overflow, names
that hold "/" and newlines, entries that repeat a name or list their ancestor.
"""

from __future__ import annotations

import errno
import os
import stat
import struct
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from pvebackup.api.errors import CorruptFilesystemError, StateError, StorageFullError, UsageError
from pvebackup.api.files import Entry
from pvebackup.host.vmfiles import extract as extract_mod
from pvebackup.host.vmfiles.ext4 import MAX_ENTRIES, parse_listing
from pvebackup.host.vmfiles.extract import Extractor, open_target, safe_name
from pvebackup.host.vmfiles.partitions import (
    MAX_LOGICAL,
    detect_filesystem,
    pick_partition,
    read_partitions,
)

MiB = 1024 * 1024
LINUX = uuid.UUID("0fc63daf-8483-4772-8e79-3d69d8477de4")
ESP = uuid.UUID("c12a7328-f81f-11d2-ba4b-00a0c93ec93b")


def reader(disk: bytearray):  # type: ignore[no-untyped-def]
    def read(offset: int, length: int) -> bytes:
        return bytes(disk[offset : offset + length])

    return read


def mbr_entry(ptype: int, lba: int, count: int) -> bytes:
    return struct.pack("<B3sB3sII", 0, b"\0\0\0", ptype, b"\0\0\0", lba, count)


def mbr(disk: bytearray, at: int, entries: list[bytes]) -> None:
    for i, e in enumerate(entries):
        disk[at + 446 + 16 * i : at + 462 + 16 * i] = e
    disk[at + 510 : at + 512] = b"\x55\xaa"


# -- partitions -----------------------------------------------------------------------


def test_mbr_primary_and_logical_partitions() -> None:
    disk = bytearray(64 * MiB)
    mbr(disk, 0, [mbr_entry(0x0C, 2048, 2048), mbr_entry(0x05, 8192, 65536)])
    # EBR 1 at 8192: logical at +2048, next EBR at +20480; EBR 2: logical, end.
    mbr(disk, 8192 * 512, [mbr_entry(0x83, 2048, 4096), mbr_entry(0x05, 20480, 8192)])
    mbr(disk, (8192 + 20480) * 512, [mbr_entry(0x83, 2048, 2048)])
    parts = read_partitions(reader(disk), len(disk))
    assert [(p.number, p.offset // 512, p.linux) for p in parts] == [
        (1, 2048, False),
        (5, 8192 + 2048, True),
        (6, 8192 + 20480 + 2048, True),
    ]
    assert pick_partition(parts, None) == parts[1]
    assert pick_partition(parts, 1) == parts[0]
    with pytest.raises(UsageError, match="no partition 3"):
        pick_partition(parts, 3)


def test_ebr_loop_and_out_of_disk_partitions_are_bounded() -> None:
    disk = bytearray(8 * MiB)
    # A partition past the end of the disk, one over the table, an EBR pointing at itself.
    mbr(disk, 0, [mbr_entry(0x83, 2048, 1 << 30), mbr_entry(0x83, 0, 100),
                  mbr_entry(0x05, 4096, 4096)])  # fmt: skip
    mbr(disk, 4096 * 512, [mbr_entry(0x83, 1, 100), mbr_entry(0x05, 0, 4096)])
    parts = read_partitions(reader(disk), len(disk))
    assert [p.number for p in parts] == [5]
    # A chain of EBRs each pointing to the next: at most MAX_LOGICAL are followed.
    disk = bytearray(4 * MiB)
    mbr(disk, 0, [mbr_entry(0x05, 1, 8000)])
    for i in range(1, 7000):
        mbr(disk, (1 + i - 1) * 512, [mbr_entry(0x83, 7000, 1), mbr_entry(0x05, i, 1)])
    assert len(read_partitions(reader(disk), len(disk))) == MAX_LOGICAL


def gpt(disk: bytearray, entries: list[tuple[uuid.UUID, int, int]], count: int = 128) -> None:
    mbr(disk, 0, [mbr_entry(0xEE, 1, len(disk) // 512 - 1)])
    header = struct.pack("<8sIIIIQQQQ16sQIII", b"EFI PART", 0x10000, 92, 0, 0, 1, 0, 34, 0,
                         bytes(16), 2, count, 128, 0)  # fmt: skip
    disk[512 : 512 + len(header)] = header
    for i, (ptype, first, last) in enumerate(entries):
        e = struct.pack("<16s16sQQQ72s", ptype.bytes_le, bytes(16), first, last, 0, bytes(72))
        disk[1024 + 128 * i : 1024 + 128 * (i + 1)] = e


def test_gpt_partitions_and_a_hostile_header() -> None:
    disk = bytearray(16 * MiB)
    gpt(disk, [(ESP, 2048, 4095), (LINUX, 4096, 16383), (LINUX, 20000, 1 << 40)])
    parts = read_partitions(reader(disk), len(disk))
    assert [(p.number, p.offset, p.size, p.linux) for p in parts] == [
        (1, 2048 * 512, 2048 * 512, False),
        (2, 4096 * 512, 12288 * 512, True),
    ]
    assert pick_partition(parts, None) == parts[1]
    # 2^32-1 entries claimed: not read (no allocation of that size), no table.
    gpt(disk, [(LINUX, 4096, 8191)], count=0xFFFFFFFF)
    assert read_partitions(reader(disk), len(disk)) == []
    assert read_partitions(reader(bytearray(100)), 100) == []


def test_filesystem_signatures() -> None:
    disk = bytearray(1 * MiB)
    assert detect_filesystem(reader(disk), len(disk)) is None
    disk[1080:1082] = b"\x53\xef"
    assert detect_filesystem(reader(disk), len(disk)) == "ext"
    disk = bytearray(1 * MiB)
    disk[0:4] = b"XFSB"
    assert detect_filesystem(reader(disk), len(disk)) == "xfs"
    assert detect_filesystem(reader(disk), 2) is None  # the magic lies past the partition


# -- the debugfs listing parser -----------------------------------------------------


def test_listing_keeps_names_with_slashes_and_newlines_whole() -> None:
    out = (
        b"/2/040755/0/0/.//\n/2/040755/0/0/..//\n"
        b"/12/100644/0/0/a/5/\nb/7/\n"  # a name holding "/5/\n"
        b"/13/120777/1000/100/../../etc/11/\n"
        b"/0/000000/0/0//0/\n"  # an unused slot
        b"/14/010600/0/0/x\n/99/100644/0/0/fake/1/\n\n"
    )
    entries = parse_listing(out, 2)
    assert [(e.name, e.inode, e.size) for e in entries] == [
        (b"a/5/\nb", 12, 7),
        (b"../../etc", 13, 11),
        (b"x\n/99/100644/0/0/fake", 14, 1),
    ]
    assert entries[1].is_symlink and entries[1].uid == 1000
    with pytest.raises(CorruptFilesystemError, match="unreadable listing"):
        parse_listing(b"/12/100644/0/0/a/5/\ngarbage\n", 2)


def test_listing_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("pvebackup.host.vmfiles.ext4.MAX_ENTRIES", 3)
    out = b"".join(b"/%d/100644/0/0/f%d/1/\n" % (i + 20, i) for i in range(4))
    with pytest.raises(CorruptFilesystemError, match="more than 3 entries"):
        parse_listing(out, 2)
    assert MAX_ENTRIES >= 1 << 16


# -- the extractor --------------------------------------------------------------------


def entry(name: bytes, inode: int, kind: int, perm: int = 0o644, size: int = 0) -> Entry:
    return Entry(name, inode, kind | perm, 0, 0, size)


class FakeReader:
    """A file system as a forger writes it: {dir inode: entries}, contents, links."""

    def __init__(self) -> None:
        self.dirs: dict[int, list[Entry]] = {}
        self.data: dict[int, bytes] = {}
        self.links: dict[int, bytes] = {}

    def list_dir(self, inode: int) -> list[Entry]:
        return self.dirs[inode]

    def readlink(self, e: Entry) -> bytes:
        return self.links[e.inode]

    def read(self, e: Entry) -> Iterator[bytes]:
        yield self.data[e.inode]


def extract(fake: FakeReader, target: Path) -> tuple[Extractor, list[str]]:
    warnings: list[str] = []
    fd, _ = open_target(target)
    ex = Extractor(fake, warnings.append)  # type: ignore[arg-type]
    try:
        ex.extract_children(fd, entry(b"/", 2, stat.S_IFDIR), "")
    finally:
        os.close(fd)
    return ex, warnings


def test_a_second_entry_of_a_symlinks_name_is_not_written_through_it(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    fake = FakeReader()
    fake.dirs[2] = [
        entry(b"evil", 10, stat.S_IFLNK, 0o777, len(str(outside))),
        entry(b"evil", 11, stat.S_IFDIR, 0o755),  # the same name again, a directory
        entry(b"evil", 12, stat.S_IFREG, 0o644, 3),  # and a file
        entry(b"a/../../x", 13, stat.S_IFREG, 0o644, 3),
        entry(b"..", 14, stat.S_IFREG, 0o644, 3),
        entry(b"dev", 15, stat.S_IFBLK, 0o600),
        entry(b"setuid", 16, stat.S_IFREG, 0o6755, 3),
        entry(b"sub", 17, stat.S_IFDIR, 0o555),
    ]
    fake.links[10] = str(outside).encode()
    fake.dirs[11] = [entry(b"planted", 20, stat.S_IFREG, 0o644, 3)]
    fake.dirs[17] = [entry(b"loop", 2, stat.S_IFDIR, 0o755), entry(b"f", 21, stat.S_IFREG)]
    for ino in (12, 13, 14, 16, 20, 21):
        fake.data[ino] = b"abc"
    fake.data[21] = b""
    target = tmp_path / "t"
    ex, warnings = extract(fake, target)
    assert list(outside.iterdir()) == []
    assert not (tmp_path / "x").exists()
    assert os.readlink(target / "evil") == str(outside)
    assert sorted(os.listdir(target)) == ["evil", "setuid", "sub"]
    assert stat.S_IMODE((target / "setuid").stat().st_mode) == 0o755
    assert stat.S_IMODE((target / "sub").stat().st_mode) == 0o555
    assert os.listdir(target / "sub") == ["f"]  # the loop back to / was not followed
    assert sorted(ex.result.skipped) == [
        "/..", "/a/../../x", "/dev", "/evil", "/evil", "/sub/loop"
    ]  # fmt: skip
    assert len(warnings) == 6
    assert not safe_name(b"") and not safe_name(b"x" * 256) and not safe_name(b"a\0b")


def test_sizes_beyond_the_free_space_and_enospc_are_storage_full(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakeReader()
    fake.dirs[2] = [entry(b"huge", 10, stat.S_IFREG, 0o644, 1 << 62)]
    with pytest.raises(StorageFullError, match="bytes are free"):
        extract(fake, tmp_path / "a")
    fake.dirs[2] = [entry(b"small", 11, stat.S_IFREG, 0o644, 3)]
    fake.data[11] = b"abc"

    def full(fd: int, data: object) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(extract_mod.os, "write", full)
    with pytest.raises(StorageFullError, match="no space left"):
        extract(fake, tmp_path / "b")


def test_target_must_be_new_or_empty(tmp_path: Path) -> None:
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("x")
    with pytest.raises(StateError, match="not empty"):
        open_target(busy)
    (tmp_path / "file").write_text("x")
    with pytest.raises(StateError, match="not a directory"):
        open_target(tmp_path / "file")
    with pytest.raises(UsageError, match="cannot create"):
        open_target(tmp_path / "missing/parent")
    fd, created = open_target(tmp_path / "new")
    os.close(fd)
    assert created


class DamagedReader(FakeReader):
    """Inode 11 fails half-way through its contents, as a damaged extent tree does."""

    def read(self, e: Entry) -> Iterator[bytes]:
        if e.inode == 11:
            yield b"partial"
            raise CorruptFilesystemError("ext4 file system: reading inode 11 failed")
        yield from super().read(e)


def test_one_unreadable_file_is_removed_and_the_rest_extracted(tmp_path: Path) -> None:
    fake = DamagedReader()
    fake.dirs[2] = [
        entry(b"bad", 11, stat.S_IFREG, 0o644, 100),
        entry(b"good", 12, stat.S_IFREG, 0o644, 3),
    ]
    fake.data[12] = b"abc"
    ex, warnings = extract(fake, tmp_path / "t")
    assert os.listdir(tmp_path / "t") == ["good"]  # no partial "bad"
    assert ex.result.unreadable == ["/bad"] and ex.result.files == 1
    assert "reading inode 11 failed" in warnings[0]
