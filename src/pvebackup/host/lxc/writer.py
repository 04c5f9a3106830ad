"""Write a container's file tree into restore targets without ever leaving them.

Both restore mechanisms (a tar archive, a directory) turn their input into a
stream of :class:`Entry` values; :class:`SafeTreeWriter` puts them on disk. The
safety rules (see ``docs/design.md``, host-lxc):

- Names are relative container paths. An absolute name or a ``..`` component is
  refused; ``.`` and empty components are dropped.
- Each entry goes to the target with the longest matching container prefix
  (``/srv/data/x`` to the ``/srv/data`` target, everything else to ``/``).
- No symlink is ever followed: parent directories are opened one component at a
  time with ``O_NOFOLLOW`` relative to the parent's file descriptor, and every
  entry is created with ``*at`` calls on that descriptor, so a symlink placed by
  an earlier entry (or by anyone racing us) cannot redirect a write. A parent that
  is a symlink is refused.
- A relative symlink whose target climbs above the container root from the
  link's own location is refused; absolute symlinks are fine (a container
  resolves them against its own root, and the host never follows them).
- A hard link must point at a non-directory extracted earlier in the same run,
  within the same target.
- On a refused entry :class:`UnsafeArchiveError` is raised and the whole restore
  fails; what was written so far stays inside the targets, for the host to remove.

Ids are never mapped here: owners, ACL entries and file capabilities are written
as the container has them, and the kernel maps them. For an unprivileged
container the writer runs inside a user namespace with the target's id map (see
:mod:`pvebackup.host.lxc.userns`), as the container's root: the kernel then
refuses what that root could not do either (device nodes, ``trusted.*`` xattrs,
owners outside the map) and turns a ``security.capability`` into the v3 form bound
to the namespace's root. The writer refuses to run with a non-empty map unless the
kernel's map of its process is that map. For a privileged container (empty map)
it runs as host root and writes everything verbatim.

- An owner the map cannot express becomes the container's ``nobody`` (or, when
  that is unmapped too, the container's root), logged once per id; its
  setuid/setgid bit is dropped, since nobody asked for a setuid-``nobody`` file.
- A device node the kernel refuses (``EPERM``) is skipped with a warning naming it,
  and so are hard links to it; other entries carry on.

Directory mtimes are set last, after everything inside them was written.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Protocol

from pvebackup.api.acl import ACL_XATTRS, map_acl_xattr
from pvebackup.api.errors import UnsafeArchiveError, UnsafeStorageError, UsageError
from pvebackup.api.idmap import OVERFLOW_ID, IdMapper
from pvebackup.api.types import IdMapEntry, LogFunction
from pvebackup.kit import safefs
from pvebackup.kit.oserrors import os_error

__all__ = ["Entry", "EntryKind", "Reader", "SafeTreeWriter", "kernel_id_map", "split_name"]

_CHUNK = 1 << 20
_ZERO_CHUNK = bytes(_CHUNK)
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# Named warnings per kind of skipped entry; the rest are counted (a hostile
# archive with a million device nodes must not make a million log lines).
_NAMED_SKIPS = 100


class Reader(Protocol):
    """Where a regular file's contents come from (a file, a tar member)."""

    def read(self, size: int = -1, /) -> bytes: ...


class EntryKind(Enum):
    FILE = "file"
    DIR = "dir"
    SYMLINK = "symlink"
    HARDLINK = "hardlink"
    CHR = "chr"
    BLK = "blk"
    FIFO = "fifo"


@dataclass
class Entry:
    """One file system object with container ids, as a restore source yields it.

    ``name`` is the path relative to the container root, as written in the source
    (validated by the writer). ``linkname`` is the symlink target, or for a hard
    link the name of the earlier entry. ``mtime_ns``/``atime_ns`` are nanoseconds.
    """

    name: str
    kind: EntryKind
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    mtime_ns: int = 0
    atime_ns: int | None = None
    linkname: str = ""
    rdev: int = 0
    size: int = 0
    xattrs: dict[str, bytes] = field(default_factory=dict)


def split_name(name: str) -> tuple[str, ...]:
    """Validate a relative container path and split it into components."""
    if name.startswith("/"):
        raise UnsafeArchiveError(f"{name!r}: absolute path")
    parts = tuple(p for p in name.split("/") if p not in ("", "."))
    if ".." in parts:
        raise UnsafeArchiveError(f"{name!r}: '..' component")
    if any("\0" in p for p in parts):
        raise UnsafeArchiveError(f"{name!r}: NUL byte in name")
    return parts


def kernel_id_map() -> list[IdMapEntry]:
    """The id map of this process's user namespace, as the kernel has it."""
    entries = []
    for kind, path in (("u", "/proc/self/uid_map"), ("g", "/proc/self/gid_map")):
        with open(path, encoding="ascii") as f:
            for line in f:
                ct, host, count = (int(x) for x in line.split())
                entries.append(IdMapEntry(kind, ct, host, count))
    return entries


def _same_map(a: Sequence[IdMapEntry], b: Sequence[IdMapEntry]) -> bool:
    return sorted(a, key=lambda e: (e.kind, e.ct_start)) == sorted(
        b, key=lambda e: (e.kind, e.ct_start)
    )


def _symlink_stays_inside(location: tuple[str, ...], target: str) -> bool:
    """Whether a relative symlink at ``location`` stays below the container root."""
    if target.startswith("/"):
        return True
    stack = list(location[:-1])
    for comp in target.split("/"):
        if comp in ("", "."):
            continue
        if comp == "..":
            if not stack:
                return False
            stack.pop()
        else:
            stack.append(comp)
    return True


class SafeTreeWriter:
    """Create entries inside ``targets`` (container path -> host directory).

    Use as a context manager; call :meth:`write` per entry in source order and
    :meth:`finish` at the end (it sets directory mtimes). ``targets`` must contain
    ``"/"``; the target directories must exist. A target is a path or an open
    directory descriptor (the writer uses a duplicate; the caller keeps its own).

    ``id_map`` is the target container's map. Non-empty, it must be the kernel's
    map of this process (the writer runs in the container's user namespace, see
    the module doc), or :class:`PveBackupError` is raised: writing container ids
    as host ids would hand the container's files to host users.
    """

    def __init__(
        self,
        targets: Mapping[str, Path | int],
        id_map: Sequence[IdMapEntry],
        log: LogFunction,
    ) -> None:
        self._log = log
        self._mapper = IdMapper(id_map)
        if id_map and not _same_map(id_map, kernel_id_map()):
            raise UsageError(
                "refusing to restore an unprivileged container outside its user namespace"
            )
        roots: dict[tuple[str, ...], Path | int] = {}
        for ct_path, host_dir in targets.items():
            if not ct_path.startswith("/"):
                raise ValueError(f"target container path must be absolute: {ct_path!r}")
            roots[split_name(ct_path.lstrip("/"))] = (
                host_dir if isinstance(host_dir, int) else Path(host_dir)
            )
        if () not in roots:
            raise ValueError("targets must include the container root '/'")
        # Longest prefixes first, so that the first match is the best one.
        self._prefixes = sorted(roots, key=len, reverse=True)
        self._paths = roots
        self._fds: dict[tuple[str, ...], int] = {}
        self._cache: tuple[tuple[str, ...], tuple[str, ...], int] | None = None
        self._linkable: set[tuple[str, ...]] = set()
        self._skipped: set[tuple[str, ...]] = set()
        self._skip_counts: dict[str, int] = {}
        self._dir_times: list[tuple[tuple[str, ...], tuple[str, ...], int, int]] = []
        self._warned: set[str] = set()

    def __enter__(self) -> SafeTreeWriter:
        try:
            for prefix in self._prefixes:
                where = self._paths[prefix]
                if isinstance(where, int):
                    self._fds[prefix] = os.dup(where)
                else:
                    self._fds[prefix] = os.open(where, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as exc:
            self.close()
            raise os_error(exc, "cannot open restore target") from exc
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._drop_cache()
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    # -- lookups ------------------------------------------------------------

    def _route(self, parts: tuple[str, ...]) -> tuple[tuple[str, ...], tuple[str, ...]]:
        for prefix in self._prefixes:
            if parts[: len(prefix)] == prefix:
                return prefix, parts[len(prefix) :]
        raise AssertionError("the root target matches every path")

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            self._log("warn", message)

    def _drop_cache(self) -> None:
        if self._cache is not None:
            os.close(self._cache[2])
            self._cache = None

    def _open_dir(
        self, prefix: tuple[str, ...], rel: tuple[str, ...], name: str, *, create: bool
    ) -> int:
        """Open directory ``rel`` of a target without following symlinks.

        The caller must not close the returned descriptor: the last one is cached,
        since consecutive entries usually share their parent.
        """
        if self._cache is not None and self._cache[:2] == (prefix, rel):
            return self._cache[2]
        self._drop_cache()

        def owned_by_ct_root(parent_fd: int, comp: str) -> None:
            os.chown(comp, self._uid(0), self._gid(0), dir_fd=parent_fd, follow_symlinks=False)

        try:
            fd = safefs.open_dir(
                self._fds[prefix], rel, create=create, on_create=owned_by_ct_root
            )
        except FileNotFoundError:
            raise UnsafeArchiveError(f"{name!r}: a parent directory does not exist") from None
        except (UnsafeStorageError, NotADirectoryError) as exc:
            raise UnsafeArchiveError(
                f"{name!r}: a parent is a symlink or not a directory ({exc})"
            ) from exc
        self._cache = (prefix, rel, fd)
        return fd

    def _uid_mapped(self, ct_uid: int) -> bool:
        try:
            self._mapper.ct_to_host_uid(ct_uid)
        except ValueError:
            return False
        return True

    def _gid_mapped(self, ct_gid: int) -> bool:
        try:
            self._mapper.ct_to_host_gid(ct_gid)
        except ValueError:
            return False
        return True

    def _uid(self, ct_uid: int) -> int:
        """The container uid to write: ``ct_uid``, or a stand-in when it is unmapped."""
        if self._uid_mapped(ct_uid):
            return ct_uid
        stand_in = OVERFLOW_ID if self._uid_mapped(OVERFLOW_ID) else 0
        self._warn_once(
            f"u{ct_uid}", f"uid {ct_uid} is not mapped; restored as uid {stand_in}"
        )
        return stand_in

    def _gid(self, ct_gid: int) -> int:
        if self._gid_mapped(ct_gid):
            return ct_gid
        stand_in = OVERFLOW_ID if self._gid_mapped(OVERFLOW_ID) else 0
        self._warn_once(
            f"g{ct_gid}", f"gid {ct_gid} is not mapped; restored as gid {stand_in}"
        )
        return stand_in

    def _mode(self, entry: Entry) -> int:
        """The entry's mode, without setuid/setgid for an owner the map cannot express."""
        mode = entry.mode & 0o7777
        if mode & stat.S_ISUID and not self._uid_mapped(entry.uid):
            mode &= ~stat.S_ISUID
            self._warn_once(
                f"suid:{entry.uid}",
                f"setuid bit dropped from files of unmapped uid {entry.uid}"
                f" (first: {entry.name!r})",
            )
        # A directory's setgid bit only makes new files inherit its group.
        if mode & stat.S_ISGID and entry.kind is not EntryKind.DIR and not self._gid_mapped(
            entry.gid
        ):
            mode &= ~stat.S_ISGID
            self._warn_once(
                f"sgid:{entry.gid}",
                f"setgid bit dropped from files of unmapped gid {entry.gid}"
                f" (first: {entry.name!r})",
            )
        return mode

    def _skip(self, kind: str, parts: tuple[str, ...], message: str) -> None:
        """Skip one entry with a warning naming it (the first few of each kind)."""
        self._skipped.add(parts)
        n = self._skip_counts.get(kind, 0) + 1
        self._skip_counts[kind] = n
        if n <= _NAMED_SKIPS:
            self._log("warn", message)

    # -- writing ------------------------------------------------------------

    def write(self, entry: Entry, data: Reader | None = None) -> None:
        """Create one entry; ``data`` gives a regular file's contents."""
        parts = split_name(entry.name)
        prefix, rel = self._route(parts)
        try:
            if not rel:
                if entry.kind is not EntryKind.DIR:
                    raise UnsafeArchiveError(f"{entry.name!r}: would replace a restore target")
                self._apply_dir(entry, prefix, rel, self._fds[prefix])
                if prefix:
                    self._mount_point_dir(entry, parts)
                return
            parent = self._open_dir(prefix, rel[:-1], entry.name, create=True)
            self._create(entry, parts, prefix, rel, parent, data)
        except OSError as exc:
            raise os_error(exc, f"restoring {entry.name!r} failed") from exc
        except (ValueError, OverflowError) as exc:
            # Values no file system object can have (times, ids, device numbers).
            raise UnsafeArchiveError(f"{entry.name!r} cannot be restored: {exc}") from exc

    def _mount_point_dir(self, entry: Entry, parts: tuple[str, ...]) -> None:
        """Create a mount point's directory in the target that encloses it.

        The archive holds the mount point's root (what the container sees there);
        the directory it is mounted on belongs to the enclosing volume and must
        exist for the container to start, so it gets the same metadata.
        """
        outer = next(p for p in self._prefixes if len(p) < len(parts) and parts[: len(p)] == p)
        rel = parts[len(outer) :]
        parent = self._open_dir(outer, rel[:-1], entry.name, create=True)
        self._create(entry, parts, outer, rel, parent, None)

    def _make_room(self, parent: int, name: str, entry: Entry) -> bool:
        """Remove what is in the way of ``entry``; True if a directory stays."""
        try:
            st = os.stat(name, dir_fd=parent, follow_symlinks=False)
        except FileNotFoundError:
            return False
        if stat.S_ISDIR(st.st_mode):
            if entry.kind is EntryKind.DIR:
                return True
            try:
                os.rmdir(name, dir_fd=parent)
            except OSError as exc:
                raise UnsafeArchiveError(
                    f"{entry.name!r}: would replace a non-empty directory"
                ) from exc
        else:
            os.unlink(name, dir_fd=parent)
        return False

    def _create(
        self,
        entry: Entry,
        parts: tuple[str, ...],
        prefix: tuple[str, ...],
        rel: tuple[str, ...],
        parent: int,
        data: Reader | None,
    ) -> None:
        name = rel[-1]
        kind = entry.kind
        if kind is EntryKind.HARDLINK:
            self._link(entry, parts, prefix, parent, name)
            return
        if kind is EntryKind.SYMLINK and "\0" in entry.linkname:
            raise UnsafeArchiveError(f"{entry.name!r}: NUL byte in symlink target")
        if kind is EntryKind.SYMLINK and (
            not entry.linkname or not _symlink_stays_inside(parts, entry.linkname)
        ):
            raise UnsafeArchiveError(
                f"{entry.name!r}: symlink target {entry.linkname!r} leaves the container root"
            )
        dir_exists = self._make_room(parent, name, entry)
        if kind is EntryKind.DIR:
            if not dir_exists:
                os.mkdir(name, 0o700, dir_fd=parent)
            fd = os.open(name, _DIR_FLAGS, dir_fd=parent)
            try:
                self._apply_dir(entry, prefix, rel, fd)
            finally:
                os.close(fd)
            return
        self._linkable.add(parts)
        if kind is EntryKind.FILE:
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            fd = os.open(name, flags, 0o600, dir_fd=parent)
            try:
                self._fill(fd, data)
                self._apply(entry, fd, fd)
            finally:
                os.close(fd)
        elif kind is EntryKind.SYMLINK:
            os.symlink(entry.linkname, name, dir_fd=parent)
            os.chown(
                name,
                self._uid(entry.uid),
                self._gid(entry.gid),
                dir_fd=parent,
                follow_symlinks=False,
            )
            self._set_xattrs(entry, f"/proc/self/fd/{parent}/{name}")
            times = (entry.atime_ns or entry.mtime_ns, entry.mtime_ns)
            os.utime(name, ns=times, dir_fd=parent, follow_symlinks=False)
        else:
            type_bits = {
                EntryKind.CHR: stat.S_IFCHR,
                EntryKind.BLK: stat.S_IFBLK,
                EntryKind.FIFO: stat.S_IFIFO,
            }[kind]
            try:
                os.mknod(name, type_bits | 0o600, entry.rdev, dir_fd=parent)
            except PermissionError:
                # The kernel's verdict: in the container's user namespace no
                # device node may be made (a host disk must not appear in the
                # container, writable by its root or by anyone).
                self._linkable.discard(parts)
                self._skip(
                    "device",
                    parts,
                    f"{entry.name}: device node {os.major(entry.rdev)}:{os.minor(entry.rdev)}"
                    " not restored (not permitted in the container)",
                )
                return
            fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent)
            try:
                if stat.S_IFMT(os.fstat(fd).st_mode) != type_bits:
                    raise UnsafeArchiveError(f"{entry.name!r}: replaced while restoring")
                # O_PATH descriptors allow no f*() calls; the /proc magic link
                # reaches exactly this inode.
                self._apply(entry, f"/proc/self/fd/{fd}", f"/proc/self/fd/{fd}")
            finally:
                os.close(fd)

    def _link(
        self,
        entry: Entry,
        parts: tuple[str, ...],
        prefix: tuple[str, ...],
        parent: int,
        name: str,
    ) -> None:
        source = split_name(entry.linkname)
        if source in self._skipped and source not in self._linkable:
            self._skip("device", parts, f"{entry.name}: hard link to a skipped device node")
            return
        if source not in self._linkable:
            raise UnsafeArchiveError(
                f"{entry.name!r}: hard link to {entry.linkname!r}, which was not restored before"
            )
        src_prefix, src_rel = self._route(source)
        if src_prefix != prefix:
            raise UnsafeArchiveError(f"{entry.name!r}: hard link across mount points")
        if source == parts:
            return
        self._make_room(parent, name, entry)
        # Keep our parent open while the source's parent takes the cache.
        dst_parent = os.dup(parent)
        try:
            src_parent = self._open_dir(prefix, src_rel[:-1], entry.name, create=False)
            os.link(
                src_rel[-1],
                name,
                src_dir_fd=src_parent,
                dst_dir_fd=dst_parent,
                follow_symlinks=False,
            )
        finally:
            os.close(dst_parent)
        self._linkable.add(parts)

    def _fill(self, fd: int, data: Reader | None) -> None:
        """Copy the contents, leaving holes where whole chunks are zero."""
        written = 0
        if data is not None:
            while chunk := data.read(_CHUNK):
                if chunk == _ZERO_CHUNK[: len(chunk)]:
                    os.lseek(fd, len(chunk), os.SEEK_CUR)
                else:
                    view = memoryview(chunk)
                    while view:
                        view = view[os.write(fd, view) :]
                written += len(chunk)
        os.ftruncate(fd, written)

    def _apply_dir(
        self, entry: Entry, prefix: tuple[str, ...], rel: tuple[str, ...], fd: int
    ) -> None:
        self._apply(entry, fd, fd, times=False)
        self._dir_times.append((prefix, rel, entry.atime_ns or entry.mtime_ns, entry.mtime_ns))

    def _apply(
        self, entry: Entry, target: int | str, xattr_target: int | str, *, times: bool = True
    ) -> None:
        os.chown(target, self._uid(entry.uid), self._gid(entry.gid))
        self._set_xattrs(entry, xattr_target)
        # After chown (which clears setuid/setgid) and after the ACL xattrs (which
        # set the group bits from the mask).
        os.chmod(target, self._mode(entry))
        if times:
            os.utime(target, ns=(entry.atime_ns or entry.mtime_ns, entry.mtime_ns))

    def _set_xattrs(self, entry: Entry, target: int | str) -> None:
        if entry.kind is not EntryKind.SYMLINK:
            # A new object inherits the default ACL of its parent directory;
            # drop what the entry itself does not have.
            for key in ACL_XATTRS:
                if key not in entry.xattrs:
                    try:
                        os.removexattr(target, key)
                    except OSError as exc:
                        if exc.errno not in (errno.ENODATA, errno.ENOTSUP, errno.EACCES):
                            raise
        for key, value in entry.xattrs.items():
            if key in ACL_XATTRS:
                try:
                    value = map_acl_xattr(value, self._uid, self._gid)
                except ValueError as exc:
                    self._warn_once(f"acl:{entry.name}", f"{entry.name}: bad ACL skipped: {exc}")
                    continue
            try:
                if isinstance(target, int):
                    os.setxattr(target, key, value)
                else:
                    os.setxattr(target, key, value, follow_symlinks=False)
            except OSError as exc:
                self._warn_once(
                    f"xattr:{key}:{exc.errno}",
                    f"cannot set xattr {key} (first on {entry.name!r}): {exc.strerror}",
                )

    def finish(self) -> None:
        """Set directory times, now that nothing more is written into them."""
        for kind, n in sorted(self._skip_counts.items()):
            if n > _NAMED_SKIPS:
                self._log("warn", f"{n - _NAMED_SKIPS} more {kind} entries not restored")
        self._drop_cache()
        for prefix, rel, atime, mtime in reversed(self._dir_times):
            if not rel:
                os.utime(self._fds[prefix], ns=(atime, mtime))
                continue
            try:
                fd = self._open_dir(prefix, rel, "/".join(prefix + rel), create=False)
            except UnsafeArchiveError:
                continue  # replaced by a later entry of another type
            os.utime(fd, ns=(atime, mtime))
        self._drop_cache()
        self._dir_times.clear()
