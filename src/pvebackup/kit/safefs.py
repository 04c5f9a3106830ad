"""Symlink-safe access to storage content: every step relative to a directory fd.

Threat: whoever can write a storage (a NAS, a shared or off-site disk, a user
with a shell on the file server) can put a symlink where we expect a directory
or a file, or swap a directory for one while we work. A path such as
``<path>/backup/<volume>`` then resolves somewhere else and ``remove`` deletes,
a backup writes, or a restore reads outside the storage. Checking with ``lstat``
first loses the race between the check and the use.

So nothing below a storage's configured path is ever resolved as a whole path:

- the configured path itself is trusted node configuration (operators link it
  to a mounted disk) and is opened once, following symlinks (:func:`open_root`);
- below it every directory is opened one component at a time with
  ``openat(O_NOFOLLOW | O_DIRECTORY)`` (:func:`open_dir`), files with
  ``O_NOFOLLOW`` and a type check on the opened fd (:func:`open_file_at`), and
  every change (mkdir, unlink, rename, link) is one name relative to a held
  directory fd. A directory swapped for a symlink after it was opened no longer
  matters: the fd still names the real directory.
- a symlink, device, fifo or socket where a directory or file is expected is
  refused with :class:`~pvebackup.api.errors.UnsafeStorageError`; other
  ``OSError`` (missing, permission, full disk) propagate unchanged for the caller
  to map. A regular file where a directory is expected raises
  ``NotADirectoryError``: nothing was followed, so that is not an attack but an
  absent directory.

Names from storage are single components: :func:`check_name` and
:func:`split_relpath` refuse empty names, ``.``, ``..``, ``/`` and NUL.

This module is also the one place for two things every layer needs, storage or
not (so that there is one implementation, with one set of guarantees):

- *bounded reads of small files* (:func:`read_fd`, used by :func:`read_file_at`
  for storage content and by the readers of trusted host files, which open
  with :func:`open_file_path`): only regular files, opened non-blocking (a fifo
  never hangs us, a device is never opened), never more than the limit in memory;
- *atomic writes* (:func:`atomic_write_at`, :func:`atomic_write_path`):
  temporary file in the same directory, fsync, rename or link, fsync of the
  directory, the temporary file removed on every error.

Every function returning an fd hands its ownership to the caller: wrap it in
:func:`owned_fd`. Imports only the standard library and :mod:`pvebackup.api`.
"""

from __future__ import annotations

import errno
import os
import secrets
import stat
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import NoReturn, TypedDict, Unpack

from pvebackup.api.errors import UnsafeStorageError

__all__ = [
    "DIR_FLAGS",
    "MAX_CONFIG_FILE_SIZE",
    "TMP_PREFIX",
    "WriteOptions",
    "atomic_write_at",
    "atomic_write_path",
    "check_name",
    "exists_at",
    "fd_path",
    "kind_at",
    "listdir_at",
    "make_dir_at",
    "open_dir",
    "open_file_at",
    "open_file_path",
    "open_root",
    "owned_fd",
    "read_fd",
    "read_file_at",
    "read_file_path",
    "rmtree_at",
    "split_relpath",
    "stat_at",
]

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
"""Flags every directory below a root is opened with."""
MAX_CONFIG_FILE_SIZE = 1024 * 1024
"""Largest guest or firewall config read from a backup (Proxmox VE's cluster file
system refuses larger files, so no real guest has one)."""
TMP_PREFIX = ".tmp-"
"""Prefix of :func:`atomic_write_at`'s temporary files (hidden: names start with a dot)."""
_FILE_FLAGS = os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK
# O_NONBLOCK: opening a fifo planted in the storage must not hang the job; for
# regular files (all we accept) it changes nothing.
_NOT_FOLLOWED = (errno.ELOOP, errno.ENOTDIR)
# openat(O_NOFOLLOW | O_DIRECTORY) on a symlink fails with ENOTDIR (Linux) or
# ELOOP (without O_DIRECTORY): both mean "not followed", find out which it was.


@contextmanager
def owned_fd(fd: int) -> Iterator[int]:
    """Close ``fd`` when the block is left, however it is left."""
    try:
        yield fd
    finally:
        os.close(fd)


def check_name(name: str) -> str:
    """Return ``name`` if it is one path component, else raise UnsafeStorageError."""
    if not name or name in (".", "..") or "/" in name or "\0" in name:
        raise UnsafeStorageError(f"{name!r} is not a plain file name")
    return name


def split_relpath(relpath: str | Sequence[str]) -> tuple[str, ...]:
    """The components of a relative path (``""`` is the start directory itself).

    :raises UnsafeStorageError: absolute, an empty component (``a//b``, a
        trailing ``/``), ``.``, ``..`` or NUL.
    """
    if isinstance(relpath, str):
        if relpath == "":
            return ()
        if relpath.startswith("/"):
            raise UnsafeStorageError(f"{relpath!r} is not a relative path")
        parts: Sequence[str] = relpath.split("/")
    else:
        parts = relpath
    for part in parts:
        check_name(part)
    return tuple(parts)


_KINDS = {
    stat.S_IFLNK: "a symlink",
    stat.S_IFDIR: "a directory",
    stat.S_IFREG: "a regular file",
    stat.S_IFIFO: "a special file (FIFO)",
    stat.S_IFCHR: "a special file (character device)",
    stat.S_IFBLK: "a special file (block device)",
    stat.S_IFSOCK: "a special file (socket)",
}
_HARMLESS = ("a directory", "a regular file", "gone")


def kind_at(dir_fd: int, name: str) -> str:
    """What ``name`` in ``dir_fd`` is now, for messages (``"a symlink"``, ``"a directory"``...).

    Picks the words for a refusal already made, nothing more (a swap between the
    failed open and this lstat changes only the message).
    """
    try:
        mode = os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode
    except OSError:
        return "gone"
    return _KINDS.get(stat.S_IFMT(mode), "a special file")


def _refuse(dir_fd: int, name: str, expected: str, exc: OSError) -> NoReturn:
    """Raise UnsafeStorageError if ``name`` is a symlink or special file, else ``exc``.

    Called after an open with ``O_NOFOLLOW`` failed: a symlink or special file
    is hostile; a plain file or directory of the wrong kind only means that
    the expected object is absent.
    """
    kind = kind_at(dir_fd, name)
    if kind not in _HARMLESS:
        raise UnsafeStorageError(
            f"refusing {name!r}: expected {expected}, found {kind} (not followed)"
        ) from exc
    raise exc


def open_root(path: str | os.PathLike[str]) -> int:
    """Open a storage's configured path (trusted, so symlinks are followed).

    :raises NotADirectoryError, FileNotFoundError, OSError: as ``open(2)``.
    """
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)


def _open_component(name: str, dir_fd: int) -> int:
    """One step of :func:`open_dir` (a seam: the race test swaps a directory here)."""
    return os.open(name, DIR_FLAGS, dir_fd=dir_fd)


def open_dir(
    base: int | str | os.PathLike[str],
    relpath: str | Sequence[str] = "",
    *,
    create: bool = False,
    mode: int = 0o755,
    durable: bool = False,
    on_create: Callable[[int, str], None] | None = None,
) -> int:
    """Open directory ``relpath`` below ``base`` one component at a time, no symlinks.

    :param base: a directory fd (borrowed: not closed) or the trusted root path
        (opened with :func:`open_root`).
    :param create: create missing components with ``mode`` (a concurrent
        creation is fine); a created component is then opened like any other,
        so a symlink swapped in between is refused too.
    :param durable: fsync the parent of each created directory, so that it
        survives a crash.
    :param on_create: called as ``on_create(parent_fd, name)`` after this call
        created the component ``name`` (to give it an owner: work relative to
        ``parent_fd``, never following ``name``).
    :returns: a new fd of the directory; the caller owns it.
    :raises UnsafeStorageError: a component is a symlink or special file, or
        ``relpath`` is not a plain relative path.
    :raises NotADirectoryError: a component is a regular file.
    :raises FileNotFoundError: a component is missing (and not ``create``).
    """
    parts = split_relpath(relpath)
    owned = not isinstance(base, int)
    fd = base if isinstance(base, int) else open_root(base)
    try:
        for name in parts:
            nfd = _step(fd, name, create, mode, durable, on_create)
            if owned:
                os.close(fd)
            fd, owned = nfd, True
    except BaseException:
        if owned:
            os.close(fd)
        raise
    return fd if owned else os.dup(fd)


def _step(
    dir_fd: int,
    name: str,
    create: bool,
    mode: int,
    durable: bool,
    on_create: Callable[[int, str], None] | None,
) -> int:
    """Open (or create and open) the subdirectory ``name`` of ``dir_fd``."""
    try:
        return _open_component(name, dir_fd)
    except FileNotFoundError:
        if not create:
            raise
    except OSError as exc:
        if exc.errno in _NOT_FOLLOWED:
            _refuse(dir_fd, name, "a directory", exc)
        raise
    try:
        os.mkdir(name, mode, dir_fd=dir_fd)
    except FileExistsError:
        pass  # made by someone else meanwhile: open it like any other
    else:
        if on_create is not None:
            on_create(dir_fd, name)
        if durable:
            os.fsync(dir_fd)
    try:
        return _open_component(name, dir_fd)
    except OSError as exc:
        if exc.errno in _NOT_FOLLOWED:
            _refuse(dir_fd, name, "a directory", exc)
        raise


def make_dir_at(dir_fd: int, name: str, mode: int = 0o700, *, durable: bool = False) -> int:
    """Create the new directory ``name`` in ``dir_fd`` and return an fd of it.

    :raises FileExistsError: ``name`` exists (whatever it is: never reused).
    :raises UnsafeStorageError: it was swapped for a symlink before we opened it.
    """
    os.mkdir(check_name(name), mode, dir_fd=dir_fd)
    if durable:
        os.fsync(dir_fd)
    return open_dir(dir_fd, (name,))


def open_file_at(dir_fd: int, name: str, flags: int = os.O_RDONLY, mode: int = 0o644) -> int:
    """Open the regular file ``name`` in ``dir_fd`` without following a symlink.

    :param flags: ``os.O_*`` access and creation flags; ``O_NOFOLLOW``,
        ``O_CLOEXEC``, ``O_NOCTTY`` and ``O_NONBLOCK`` are added.
    :returns: a new fd; the caller owns it.
    :raises UnsafeStorageError: ``name`` is a symlink, device, fifo or socket.
    :raises IsADirectoryError: ``name`` is a directory.
    """
    check_name(name)
    # Threat: a device or fifo planted in the storage. Refused before it is opened:
    # opening a tape rewinds it, opening a fifo wakes its writer. (Swapped in after
    # this lstat, the fd check below still refuses it.)
    kind = kind_at(dir_fd, name)
    if kind not in _HARMLESS and kind != "a symlink":  # a symlink: O_NOFOLLOW refuses it
        raise UnsafeStorageError(
            f"refusing {name!r}: expected a regular file, found {kind} (not opened)"
        )
    try:
        fd = os.open(name, flags | _FILE_FLAGS, mode, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            _refuse(dir_fd, name, "a regular file", exc)
        raise
    return _checked_regular(fd, name)


def open_file_path(path: str | os.PathLike[str], *, follow_symlinks: bool = True) -> int:
    """Open the regular file at a trusted host path read-only (not storage content).

    For node files (key and passphrase files, host state, configs): symlinks are
    followed unless ``follow_symlinks`` is false, as an operator may link them.
    What is never done is what hurts whatever the path: a fifo is opened
    non-blocking (no hang), and anything but a regular file is refused.

    :returns: a new fd; the caller owns it.
    :raises UnsafeStorageError: a device, fifo or socket (or a symlink, when
        not ``follow_symlinks``).
    :raises IsADirectoryError: a directory.
    :raises OSError: as ``open(2)``.
    """
    flags = os.O_RDONLY | _FILE_FLAGS
    if follow_symlinks:
        flags &= ~os.O_NOFOLLOW
    name = os.fspath(path)
    try:
        fd = os.open(name, flags)
    except OSError as exc:
        if exc.errno == errno.ELOOP and not follow_symlinks:
            raise UnsafeStorageError(f"refusing {name!r}: it is a symlink (not followed)") from exc
        raise
    return _checked_regular(fd, name)


def _checked_regular(fd: int, name: str) -> int:
    """``fd`` if it is a regular file (checked on the fd: no race), else closed and refused."""
    try:
        st_mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(st_mode):
            raise IsADirectoryError(errno.EISDIR, f"{name!r} is a directory")
        if not stat.S_ISREG(st_mode):
            raise UnsafeStorageError(
                f"refusing {name!r}: expected a regular file, found a special file"
            )
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_fd(fd: int, *, limit: int | None = None, name: str = "the file") -> bytes:
    """The content of the open regular file ``fd`` from its offset, at most ``limit`` bytes.

    The one bounded reader of small files. A file that claims, or grows to, more
    than ``limit`` bytes is refused before more than ``limit + 1`` bytes are in
    memory (a hostile or broken file must not make us allocate without bound).

    :raises OSError: ``EFBIG`` larger than ``limit`` (callers map it to their
        typed error); others as ``read(2)``.
    """
    size = os.fstat(fd).st_size
    if limit is not None and size > limit:
        raise OSError(errno.EFBIG, f"{size} bytes, more than the {limit} expected", name)
    parts = [os.read(fd, size)] if size else []
    total = len(parts[0]) if parts else 0
    while True:  # the file grew, or a short read
        want = 1 << 20 if limit is None else min(1 << 20, limit + 1 - total)
        more = os.read(fd, want) if want > 0 else b""
        if not more:
            if limit is not None and want <= 0:
                raise OSError(errno.EFBIG, f"grew beyond the {limit} bytes expected", name)
            break
        parts.append(more)
        total += len(more)
    return parts[0] if len(parts) == 1 else b"".join(parts)


def read_file_path(
    path: str | os.PathLike[str], *, limit: int | None = None, follow_symlinks: bool = True
) -> bytes:
    """The content of the regular file at a trusted host path (see :func:`open_file_path`).

    :raises OSError: as :func:`open_file_path` and :func:`read_fd` (``EFBIG``:
        larger than ``limit``).
    :raises UnsafeStorageError: not a regular file (a FIFO, a device...).
    """
    with owned_fd(open_file_path(path, follow_symlinks=follow_symlinks)) as fd:
        return read_fd(fd, limit=limit, name=os.fspath(path))


def read_file_at(dir_fd: int, name: str, *, limit: int | None = None) -> bytes:
    """The content of the regular file ``name`` in ``dir_fd`` (see :func:`open_file_at`).

    :param limit: largest size accepted; a larger file raises UnsafeStorageError
        (see :func:`read_fd`).
    """
    with owned_fd(open_file_at(dir_fd, name)) as fd:
        try:
            return read_fd(fd, limit=limit, name=name)
        except OSError as exc:
            if exc.errno == errno.EFBIG:
                raise UnsafeStorageError(f"{name!r}: {exc.strerror}") from exc
            raise


def stat_at(dir_fd: int, name: str) -> os.stat_result | None:
    """``lstat`` of ``name`` in ``dir_fd`` (a symlink is reported, not followed); None if absent."""
    try:
        return os.stat(check_name(name), dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def exists_at(dir_fd: int, name: str) -> bool:
    """True if anything, a dangling symlink too, has the name ``name`` in ``dir_fd``."""
    return stat_at(dir_fd, name) is not None


def listdir_at(dir_fd: int) -> list[os.DirEntry[str]]:
    """The entries of ``dir_fd`` (not ``.`` and ``..``), read at once.

    Ask an entry ``is_dir(follow_symlinks=False)`` / ``is_file(follow_symlinks=False)``
    while ``dir_fd`` is still open (where the file system gives no type, that is an
    ``fstatat`` on it); open one through :func:`open_dir` or :func:`open_file_at`,
    never by ``entry.path``.
    """
    with os.scandir(dir_fd) as it:
        return list(it)


def fd_path(fd: int, name: str | None = None) -> str:
    """A path naming the directory ``fd`` (and ``name`` in it) for another process.

    ``/proc/<our pid>/fd/<fd>`` names the directory we hold, wherever it is now and
    whatever was put at its old path: hand it to external tools (qemu-img) that
    take a path. It is valid while we keep ``fd`` open.
    """
    path = f"/proc/{os.getpid()}/fd/{fd}"
    return path if name is None else f"{path}/{check_name(name)}"


def atomic_write_at(
    dir_fd: int,
    name: str,
    data: bytes | bytearray | memoryview,
    *,
    mode: int | None = None,
    keep_mode: bool = False,
    overwrite: bool = True,
    durable: bool = True,
) -> bool:
    """Write ``data`` as the file ``name`` in ``dir_fd``, all or nothing.

    The one atomic file writer. Written to a temporary name
    (``.tmp-<name>.<random>``) in the same directory, fsynced (``durable``), then
    published: ``rename`` over ``name`` with ``overwrite``, else ``link`` (fails
    if ``name`` exists: an atomic no-overwrite insert, so a key file is never
    overwritten). With ``durable`` the directory is fsynced too, so that the new
    name survives a crash. The temporary file is removed whatever happens. A
    symlink at ``name`` is replaced (``overwrite``) or counts as existing, never
    followed.

    :param mode: the file's permission bits, exactly (not filtered by the umask;
        the temporary file is 0600 until then, so the data is never readable
        by more than ``mode`` allows). ``None``: 0644 less the umask.
    :param keep_mode: an existing regular file at ``name`` keeps its permission
        bits (``mode`` is for a new file).
    :returns: True if written, False if ``name`` existed and not ``overwrite``.
    :raises OSError: writing failed (nothing was published).
    """
    check_name(name)
    if not overwrite and exists_at(dir_fd, name):
        return False
    if keep_mode:
        old = stat_at(dir_fd, name)
        if old is not None and stat.S_ISREG(old.st_mode):
            mode = stat.S_IMODE(old.st_mode)
    # NAME_MAX is 255 bytes: a long name is cut, the random part keeps it unique.
    tmp = f"{TMP_PREFIX}{name[:200]}.{secrets.token_hex(6)}"
    published = False
    try:
        fd = os.open(
            tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
            0o644 if mode is None else 0o600, dir_fd=dir_fd,
        )
        try:
            if mode is not None:
                os.fchmod(fd, mode)
            with memoryview(data) as view:
                written = 0
                while written < len(view):
                    written += os.write(fd, view[written:])
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        if overwrite:
            os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            published = True
        else:
            try:
                os.link(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd, follow_symlinks=False)
            except FileExistsError:
                return False
        if durable:
            os.fsync(dir_fd)
        return True
    finally:
        if not published:
            try:
                os.unlink(tmp, dir_fd=dir_fd)
            except OSError:
                pass  # never created, or unremovable: a hidden temp name is harmless


class WriteOptions(TypedDict, total=False):
    """The keyword options of :func:`atomic_write_at`, passed on unchanged."""

    mode: int | None
    keep_mode: bool
    overwrite: bool
    durable: bool


def atomic_write_path(
    path: str | os.PathLike[str],
    data: bytes | bytearray | memoryview,
    **options: Unpack[WriteOptions],
) -> bool:
    """:func:`atomic_write_at` for a trusted host path (its directory must exist).

    For files outside any storage (node configuration, key files, host state):
    the directory part is resolved as a whole, symlinks included; only the file
    name is written without following. Storage content goes through
    :func:`open_dir`.

    :returns: as :func:`atomic_write_at`.
    """
    directory, name = os.path.split(os.fspath(path))
    with owned_fd(open_root(directory or ".")) as dir_fd:
        return atomic_write_at(dir_fd, name, data, **options)


def rmtree_at(dir_fd: int, name: str, *, missing_ok: bool = False) -> None:
    """Remove the directory ``name`` in ``dir_fd`` and everything below it.

    Symlinks inside the tree are unlinked, never followed; directories are
    entered only through ``O_NOFOLLOW`` fds, so an entry swapped for a symlink
    while we work is unlinked as a link. The walk never leaves the file system
    of ``name`` (a mount point inside it is refused, like ``rm
    --one-file-system``), and keeps no Python recursion (a deep hostile tree
    costs one fd per level, not a RecursionError).

    :raises UnsafeStorageError: ``name`` is a symlink or special file (nothing
        is removed), or a mount point was met below it (what was removed before
        stays removed).
    :raises NotADirectoryError: ``name`` is a regular file.
    :raises FileNotFoundError: ``name`` does not exist (unless ``missing_ok``).
    """
    try:
        top = open_dir(dir_fd, (check_name(name),))
    except FileNotFoundError:
        if missing_ok:
            return
        raise
    with owned_fd(top):
        device = os.fstat(top).st_dev
        if device != os.fstat(dir_fd).st_dev:
            raise UnsafeStorageError(f"refusing to remove {name!r}: it is a mount point")
        _empty_tree(top, device)
    os.rmdir(name, dir_fd=dir_fd)


def _empty_tree(top: int, device: int) -> None:
    """Remove everything below the directory ``top`` (borrowed fd), depth first."""
    # Each frame: the fd of a directory, its name in the directory of the frame
    # below, and its entries still to remove. The top frame's fd is the caller's.
    stack: list[tuple[int, str, list[os.DirEntry[str]]]] = [(top, "", listdir_at(top))]
    try:
        while stack:
            fd, name, entries = stack[-1]
            if not entries:
                stack.pop()
                if stack:
                    os.close(fd)
                    os.rmdir(name, dir_fd=stack[-1][0])
                continue
            entry = entries.pop()
            if entry.is_dir(follow_symlinks=False):
                _descend(fd, entry.name, device, stack)
                continue
            try:
                os.unlink(entry.name, dir_fd=fd)
            except FileNotFoundError:
                pass
            except IsADirectoryError:
                _descend(fd, entry.name, device, stack)  # swapped for a directory
    finally:
        for fd, _name, _entries in stack[1:]:
            os.close(fd)


def _descend(
    dir_fd: int, name: str, device: int, stack: list[tuple[int, str, list[os.DirEntry[str]]]]
) -> None:
    """Push the subdirectory ``name`` of ``dir_fd`` on ``stack`` to be emptied.

    If it is no directory any more (swapped for a symlink since the listing), it
    is unlinked as what it is now, never followed.
    """
    try:
        child = _open_component(name, dir_fd)
    except FileNotFoundError:
        return
    except OSError as exc:
        if exc.errno not in _NOT_FOLLOWED:
            raise
        try:
            os.unlink(name, dir_fd=dir_fd)
        except FileNotFoundError:
            pass
        return
    try:
        if os.fstat(child).st_dev != device:
            raise UnsafeStorageError(f"refusing to remove below {name!r}: it is a mount point")
        stack.append((child, name, listdir_at(child)))
    except BaseException:
        os.close(child)
        raise
