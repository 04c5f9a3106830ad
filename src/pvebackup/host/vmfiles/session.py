"""``vm-files``: open one disk of a VM backup as a readable guest file system.

::

    provider = new_backup_provider(...)
    restore_get_mechanism -> must be (qemu-img, qemu)
    restore_qemu_get_device_info -> the disk (--disk, else the first)
    restore_qemu_img_init -> source      ... restore_qemu_img_cleanup (always)
      qemu-storage-daemon: the source read-only, unprobed, as a FUSE file
      partition table (Python, bounded) -> the partition as a second FUSE file
      signature -> ext2/3/4: debugfs; xfs: xfs_db + our block reads
                   (others: UnsupportedFilesystemError)

Why no kernel mount: the file system is hostile input (the guest's, or whoever
can write the backup storage), and the kernel's ext4/xfs drivers are not hardened
against crafted images: mounting one is a way into the host kernel. PBS starts a
small restore VM for this, libguestfs an appliance; we read in userspace.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pvebackup.api.errors import (
    CorruptFilesystemError,
    ExternalToolError,
    NotFoundError,
    PluginError,
    UnsupportedError,
    UnsupportedFilesystemError,
    UsageError,
)
from pvebackup.api.files import Entry, FsReader, lookup
from pvebackup.api.types import GuestType, RestoreMechanism
from pvebackup.host.guests import NodeRoot
from pvebackup.host.signals import abort_on_signals
from pvebackup.host.tasklog import LogRouter
from pvebackup.host.vmfiles.blockfile import BlockFiles
from pvebackup.host.vmfiles.ext4 import Ext4Reader
from pvebackup.host.vmfiles.extract import Extractor, ExtractResult, open_target
from pvebackup.host.vmfiles.partitions import (
    Partition,
    detect_filesystem,
    pick_partition,
    read_partitions,
)
from pvebackup.host.vmfiles.xfs import XfsReader
from pvebackup.kit import proc
from pvebackup.storage import new_backup_provider, parse_volume_id, read_storage_config

__all__ = [
    "FileInfo",
    "GuestFilesystem",
    "extract_entries",
    "extract_files",
    "list_entries",
    "list_files",
    "open_guest_filesystem",
    "split_guest_path",
]

_WORKDIR_PREFIX = "pvebackup-vmfiles-"
_READERS: dict[str, Callable[[Path], FsReader]] = {"ext": Ext4Reader, "xfs": XfsReader}


@dataclass(frozen=True, slots=True)
class GuestFilesystem:
    """An opened guest file system and where it came from."""

    reader: FsReader
    disk: str
    partition: Partition | None
    fstype: str


@contextmanager
def open_guest_filesystem(
    root: NodeRoot,
    volid: str,
    *,
    disk: str | None = None,
    partition: int | None = None,
    log: LogRouter,
) -> Iterator[GuestFilesystem]:
    """Open the file system on ``disk`` (and ``partition``) of VM backup ``volid``.

    :raises UnsupportedError: not a VM backup, or the storage has no provider.
    :raises UsageError: no such disk or partition.
    :raises UnsupportedFilesystemError: no file system we can read there.
    :raises CorruptFilesystemError: the file system cannot be opened.
    """
    cfg = read_storage_config(root.storage_cfg)
    storeid, volname = parse_volume_id(volid)
    provider = new_backup_provider(cfg, storeid, log)
    if provider is None:
        raise UnsupportedError(f"storage '{storeid}' has no backup provider")
    answer = provider.restore_get_mechanism(volname, storeid)
    if not isinstance(answer, tuple | list) or len(answer) != 2:
        raise PluginError(f"restore_get_mechanism returned {answer!r:.80}")
    if (str(answer[0]), str(answer[1])) != (RestoreMechanism.QEMU_IMG, GuestType.QEMU):
        raise UnsupportedError(
            f"{volid} is not a VM disk backup ({answer[1]}, {answer[0]}); vm-files reads VM"
            " backups only"
        )
    info = provider.restore_qemu_get_device_info(volname, storeid)
    disks = list(info) if isinstance(info, dict) else []
    if not disks:
        raise UnsupportedError(f"{volid} holds no disks")
    if disk is None:
        # EFI vars and TPM state hold no guest file system worth a default.
        data = [d for d in disks if "efidisk" not in d and "tpmstate" not in d]
        disk = (data or disks)[0]
        if len(disks) > 1:
            log.info(f"reading disk {disk} (of {', '.join(disks)}; choose with --disk)")
    elif disk not in disks and f"drive-{disk}" in disks:
        disk = f"drive-{disk}"  # the config key (scsi0) names the device drive-scsi0
    elif disk not in disks:
        raise UsageError(f"{volid} has no disk {disk} (disks: {', '.join(disks)})")
    _detach_stale_exports()
    # SIGINT/SIGTERM become AbortedError, so the daemon quits and unmounts its exports.
    with abort_on_signals():
        workdir = proc.private_dir(_WORKDIR_PREFIX)
        try:
            try:
                source = provider.restore_qemu_img_init(volname, storeid, disk)
                if not isinstance(source, str | os.PathLike) or not str(source):
                    raise PluginError(f"restore_qemu_img_init returned {source!r:.80}")
                with BlockFiles(str(source), workdir) as files:
                    yield _open(files, disk, partition, log)
            finally:
                provider.restore_qemu_img_cleanup(volname, storeid, disk)
        finally:
            _remove_workdir(workdir)


def _open(files: BlockFiles, disk: str, number: int | None, log: LogRouter) -> GuestFilesystem:
    size = files.size()
    whole = files.export()
    fd = os.open(whole, os.O_RDONLY | os.O_CLOEXEC)
    try:

        def read(offset: int, length: int) -> bytes:
            return os.pread(fd, length, offset)

        parts = read_partitions(read, size)
        part = pick_partition(parts, number)
        if part is None and number is None:
            fstype = detect_filesystem(read, size)
        else:
            assert part is not None
            base = part.offset
            fstype = detect_filesystem(lambda o, n: read(base + o, n), part.size)
    finally:
        os.close(fd)
    where = disk if part is None else f"{disk} partition {part.number}"
    if fstype is None:
        raise UnsupportedFilesystemError(f"{where}: no file system found")
    if fstype not in _READERS:
        raise UnsupportedFilesystemError(
            f"{where}: {fstype} file systems cannot be read by vm-files (ext2/3/4 and xfs only)"
        )
    image = whole if part is None else files.export(part.offset, part.size)
    log.info(f"reading the {fstype} file system on {where}")
    return GuestFilesystem(_READERS[fstype](image), disk, part, fstype)


def _remove_workdir(workdir: Path) -> None:
    try:
        shutil.rmtree(workdir)
    except OSError:
        _detach(workdir)
        shutil.rmtree(workdir, ignore_errors=True)


def _detach(workdir: Path) -> None:
    """Lazily unmount FUSE exports left in ``workdir`` by a daemon that was killed."""
    for path in sorted(workdir.glob("export*.img")):
        try:
            os.stat(path)
            continue  # a file (no mount), or a live mount
        except OSError as exc:
            if exc.errno != errno.ENOTCONN:
                continue
        try:
            proc.run(["umount", "-l", str(path)], timeout=30)
        except ExternalToolError:
            pass


def _detach_stale_exports(tmp: Path | None = None) -> None:
    """Remove what a killed run left: dead FUSE exports and their private dirs.

    Only directories whose exports are dead (``ENOTCONN``: the daemon is gone) are
    touched, so a vm-files running beside us keeps its own.
    """
    base = tmp if tmp is not None else Path(tempfile.gettempdir())
    for workdir in base.glob(f"{_WORKDIR_PREFIX}*"):
        dead = False
        for path in workdir.glob("export*.img"):
            try:
                os.stat(path)
            except OSError as exc:
                dead = dead or exc.errno == errno.ENOTCONN
        if dead:
            _detach(workdir)
            shutil.rmtree(workdir, ignore_errors=True)


# -- the two commands ---------------------------------------------------------------

_TYPES = {
    stat.S_IFREG: "file",
    stat.S_IFDIR: "dir",
    stat.S_IFLNK: "symlink",
    stat.S_IFIFO: "fifo",
    stat.S_IFSOCK: "socket",
    stat.S_IFCHR: "chardev",
    stat.S_IFBLK: "blockdev",
}


@dataclass(frozen=True, slots=True)
class FileInfo:
    """One listed entry (as the guest file system describes it)."""

    name: bytes
    type: str
    mode: int
    """Permission bits with setuid, setgid and sticky (``mode & 0o7777``)."""
    uid: int
    gid: int
    size: int
    inode: int
    target: bytes | None
    """A symbolic link's target."""
    mtime_ns: int | None = None


def split_guest_path(path: str) -> list[bytes]:
    """``/a//b/`` -> ``[b"a", b"b"]``. :raises UsageError: a ``..`` component."""
    parts = [p for p in os.fsencode(path).split(b"/") if p not in (b"", b".")]
    if b".." in parts:
        raise UsageError(f"guest path {path!r}: '..' is not allowed")
    return parts


def _lookup(reader: FsReader, path: str, where: str = "the guest") -> Entry:
    try:
        return lookup(reader, split_guest_path(path))
    except FileNotFoundError as exc:
        raise NotFoundError(f"{path}: no such file or directory in {where} ({exc})") from exc


def list_files(fs: GuestFilesystem, path: str = "/") -> list[FileInfo]:
    """The entries of directory ``path`` (sorted by name), or ``path`` itself."""
    return list_entries(fs.reader, path)


def list_entries(reader: FsReader, path: str = "/", where: str = "the guest") -> list[FileInfo]:
    """:func:`list_files` for any file tree reader (``where`` names it in errors)."""
    entry = _lookup(reader, path, where)
    entries = reader.list_dir(entry.inode) if entry.is_dir else [entry]
    infos = []
    for e in sorted(entries, key=lambda e: e.name):
        target = reader.readlink(e) if e.is_symlink else None
        kind = _TYPES.get(stat.S_IFMT(e.mode), "unknown")
        infos.append(FileInfo(e.name, kind, e.mode & 0o7777, e.uid, e.gid, e.size, e.inode,
                              target, e.mtime_ns))  # fmt: skip
    return infos


def extract_files(
    fs: GuestFilesystem,
    path: str,
    target: Path,
    *,
    keep_owner: bool = False,
    log: LogRouter,
) -> ExtractResult:
    """Write ``path`` below ``target``: a directory's contents, or the one entry.

    :raises StateError: ``target`` exists and is not an empty directory.
    :raises StorageFullError: the target's file system is full.
    :raises CorruptFilesystemError: some entries could not be read (the others were
        extracted; each unreadable one was warned about).
    """
    entry = _lookup(fs.reader, path)
    dir_fd, _created = open_target(target)
    try:
        extractor = Extractor(fs.reader, log.warn, keep_owner=keep_owner)
        shown = "/" + b"/".join(split_guest_path(path)).decode(errors="backslashreplace")
        if entry.is_dir:
            extractor.extract_children(dir_fd, entry, shown)
        else:
            extractor.extract(dir_fd, entry, shown)
    finally:
        os.close(dir_fd)
    return _checked(extractor.result, target)


def extract_entries(
    reader: FsReader,
    paths: list[str],
    target: Path,
    *,
    keep_owner: bool,
    log: LogRouter,
    where: str,
) -> ExtractResult:
    """Write each of ``paths`` below ``target`` under its own name (``/``: the
    root's contents), with the same safe extractor as :func:`extract_files`.

    Every path is looked up before anything is written: a typo costs nothing.
    :raises NotFoundError: a path is not in the tree.
    """
    entries = [(path, _lookup(reader, path, where)) for path in paths]
    dir_fd, _created = open_target(target)
    try:
        extractor = Extractor(reader, log.warn, keep_owner=keep_owner)
        for path, entry in entries:
            shown = "/" + b"/".join(split_guest_path(path)).decode(errors="backslashreplace")
            if shown == "/":
                extractor.extract_children(dir_fd, entry, shown)
            else:
                extractor.extract(dir_fd, entry, shown)
    finally:
        os.close(dir_fd)
    return _checked(extractor.result, target)


def _checked(result: ExtractResult, target: Path) -> ExtractResult:
    bad = result.unreadable
    if bad:
        raise CorruptFilesystemError(
            f"{len(bad)} entries could not be read from the damaged backup (first:"
            f" {bad[0]}); everything else was extracted into {target}"
        )
    return result
