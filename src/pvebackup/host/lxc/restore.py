"""Container restore: fill new target directories from a tar archive or a directory.

The two restore mechanisms of the seed for containers. Both read objects with
*container* ids (what a provider stores) and write them through
:class:`~pvebackup.host.lxc.writer.SafeTreeWriter`, which refuses hostile entries
(see that module).

Where the writer runs depends on the target container:

- **Unprivileged** (a non-empty id map): in a helper process that is root of a user
  namespace with the container's map (:mod:`pvebackup.host.lxc.userns`). The
  kernel then maps the ids and refuses what the container's root could not do; a
  crafted archive cannot give a host user a capability or a host disk.
- **Privileged** (an empty map): in this process, as host root. The container's
  root *is* host root, so device nodes, capabilities and ids are written as they
  are, as Proxmox VE does.

``targets`` maps container paths to the host directories to fill: ``"/"`` for the
root file system, ``"/srv/data"`` for a mount point; each entry goes to the target
with the longest matching prefix. On any error the restore stops; the targets
then hold a partial tree which the caller removes.

``rate`` (bytes per second, ``0``: unlimited) paces what the restore reads, as
``--bwlimit`` paces a VM disk's ``qemu-img convert``: the archive's bytes, or the
tar stream made from a directory, through :mod:`pvebackup.kit.pacing`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import BinaryIO

from pvebackup.api.types import IdMapEntry, LogFunction
from pvebackup.host.lxc.tarstream import restore_tar_stream, write_pax_stream
from pvebackup.host.lxc.treesource import walk_source
from pvebackup.host.lxc.userns import restore_in_userns
from pvebackup.host.lxc.writer import SafeTreeWriter
from pvebackup.kit.oserrors import os_error
from pvebackup.kit.pacing import PacedWriter, TokenBucket, paced_reader

__all__ = ["copy_directory", "extract_tar"]

# Control characters of hostile names, shown escaped: a name must not start a
# log line of its own.
_CHUNK = 1 << 16

_CONTROL = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F) if c != 0x09}


def _readable(log: LogFunction) -> LogFunction:
    """``log`` for messages naming archive entries: non-UTF-8 bytes and controls escaped."""

    def write(level: str, message: str) -> None:
        text = message.encode("utf-8", "backslashreplace").decode("utf-8")
        log(level, text.translate(_CONTROL))

    return write


def extract_tar(
    archive: Path,
    targets: Mapping[str, Path],
    id_map: Sequence[IdMapEntry],
    *,
    log: LogFunction,
    rate: int = 0,
) -> None:
    """Extract a (zstd, gzip, bzip2, xz or plain) tar archive into ``targets``.

    Member names are relative container paths (``./etc/passwd`` or ``etc/passwd``)
    with container ids. PAX ``SCHILY.xattr.*`` records become xattrs (POSIX ACLs
    as ``system.posix_acl_*`` raw values); GNU tar's text ACLs
    (``SCHILY.acl.access``/``default``) are used when no raw value is present.
    Sockets and unknown member types are skipped with a warning, and so are device
    nodes in an unprivileged container.

    Raises :class:`UnsafeArchiveError` for a hostile member,
    :class:`IntegrityError` for an unreadable archive, :class:`PveBackupError`
    when writing fails.
    """
    log = _readable(log)
    try:
        raw = open(archive, "rb")
    except OSError as exc:
        raise os_error(exc, f"cannot open archive {archive}") from exc
    limiter = TokenBucket(rate)
    with raw:
        if id_map and not rate:
            count = restore_in_userns(
                targets, id_map, log=log, label=archive.name, source_fd=raw.fileno()
            )
        elif id_map:

            def feed(stream: BinaryIO, between: Callable[[], None]) -> None:
                paced = PacedWriter(stream, limiter, between)
                while chunk := raw.read(_CHUNK):
                    paced.write(chunk)

            count = restore_in_userns(targets, id_map, log=log, label=archive.name, feed=feed)
        else:
            with SafeTreeWriter(targets, id_map, log) as writer:
                source = paced_reader(raw, limiter) if rate else raw
                count = restore_tar_stream(source, writer, log, label=archive.name)
    log("info", f"restored {count} entries from {archive.name}")


def copy_directory(
    source: Path,
    targets: Mapping[str, Path],
    id_map: Sequence[IdMapEntry],
    *,
    log: LogFunction,
    rate: int = 0,
) -> None:
    """Copy a directory holding a container's file system (with container ids).

    The same rules as :func:`extract_tar` apply: hard links inside ``source``
    (same inode) stay hard links, xattrs and ACLs are copied, symlinks are copied
    as they are and never followed, sockets are skipped. ``source`` is read
    through descriptors, never following a symlink (see
    :mod:`pvebackup.host.lxc.treesource`): a directory of it swapped for a symlink
    meanwhile cannot bring the host's files in. Raises
    :class:`UnsafeArchiveError` for a symlink leaving the root or a symlinked
    source, :class:`PveBackupError` when reading or writing fails.
    """
    log = _readable(log)
    limiter = TokenBucket(rate)
    if id_map:

        def feed(stream: BinaryIO, between: Callable[[], None]) -> None:
            out = PacedWriter(stream, limiter) if rate else stream
            write_pax_stream(
                walk_source(source, log), out, log, between=between  # type: ignore[arg-type]
            )

        count = restore_in_userns(targets, id_map, log=log, label=str(source), feed=feed)
    else:
        count = 0
        with SafeTreeWriter(targets, id_map, log) as writer:
            for entry, data in walk_source(source, log):
                if data is not None:
                    limiter.consume(entry.size)  # the file's bytes, paid before they move
                writer.write(entry, data)
                count += 1
            writer.finish()
    log("info", f"restored {count} entries from {source}")
