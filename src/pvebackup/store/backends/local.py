"""A store in a local directory: one file per key, ``/`` in keys are directories.

Every ``put`` writes a temporary file (``.tmp-*``, in the target's directory, so on
the same filesystem), fsyncs it when durable, and then publishes it:
``link`` for ``overwrite=False`` (fails with EEXIST if the key exists: an atomic
no-overwrite insert, so two processes inserting the same chunk both succeed) or
``rename`` for ``overwrite=True``; then it fsyncs the directory. The temporary
file is always removed (:func:`pvebackup.kit.safefs.atomic_write_at`). ``sync``
fsyncs what this object changed without durability since the last ``sync``
(the files of non-durable puts, the directories holding them and their
ancestors, the directories of deletes), so that a snapshot's few files cost a
few fsyncs. Past ``SYNC_TRACKED`` changes it calls ``syncfs(2)`` on the store's
filesystem instead: one flush for a large batch, but one that also waits for
every other writer's dirty data on that filesystem (0.5 s measured on a shared
root filesystem), hence not the default.

Threat: whoever can write the store's directory can plant a symlink at
``chunks/ab``, ``chunks`` or ``snapshots/...`` (or swap a directory for one while
we run) to make a backup write, or ``remove``/GC delete, outside the store. So
the root (the configured path, trusted, may itself be a symlink) is opened once
and held; every key is reached from it one directory at a time with
``O_NOFOLLOW`` (:mod:`pvebackup.kit.safefs`). A symlink, device, fifo or socket
met on the way raises :class:`~pvebackup.api.errors.UnsafeStorageError` (exit 8):
the store is tampered with, and no retry helps. ``list`` shows regular files only
and does not enter symlinked directories.

OSError mapping: ENOENT on read is ``ObjectNotFoundError``; EINTR, EAGAIN, EBUSY,
ETIMEDOUT, ESTALE are ``TransientBackendError``; ENOSPC and EDQUOT are
``StorageFullError`` (a ``PermanentBackendError`` with its own exit code, 12);
everything else (EACCES, EPERM, EROFS, EIO, ...) is ``PermanentBackendError``.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
import threading
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

from pvebackup.api.errors import (
    ObjectNotFoundError,
    PermanentBackendError,
    StorageFullError,
    TransientBackendError,
    UnsafeStorageError,
)
from pvebackup.kit import safefs
from pvebackup.kit.safefs import owned_fd
from pvebackup.store.backends.base import ObjectInfo, check_range, validate_key

__all__ = ["LocalBackend"]

SYNC_TRACKED = 1024
"""Changes ``sync`` flushes one by one; past that, one ``syncfs`` of the filesystem."""
_TRANSIENT = frozenset({errno.EINTR, errno.EAGAIN, errno.EBUSY, errno.ETIMEDOUT, errno.ESTALE})


def _fail(what: str, path: Path | str, exc: OSError) -> NoReturn:
    msg = f"{what} {path}: {exc.strerror or exc}"
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        raise StorageFullError(msg) from exc
    if exc.errno in _TRANSIENT:
        raise TransientBackendError(msg) from exc
    raise PermanentBackendError(msg) from exc


class LocalBackend:
    """A backend over the directory ``root`` (created if missing).

    Holds an fd of ``root`` for its lifetime (closed when the backend is
    collected, or by :meth:`close`).
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            self._root_fd = safefs.open_root(self.root)
        except OSError as exc:
            _fail("cannot open store directory", self.root, exc)
        self._closer = weakref.finalize(self, os.close, self._root_fd)
        self._sync_lock = threading.Lock()
        self._dirty_files: set[str] = set()
        self._dirty_dirs: set[str] = set()
        self._untracked = False  # too many changes tracked: sync flushes the filesystem

    def __repr__(self) -> str:
        return f"LocalBackend({str(self.root)!r})"

    def close(self) -> None:
        """Close the store directory's fd (the backend cannot be used afterwards)."""
        self._closer()

    def _parent(self, key: str, *, create: bool = False, durable: bool = False) -> tuple[int, str]:
        """An fd of the directory holding ``key`` (the caller closes it), and the last name.

        :raises FileNotFoundError, NotADirectoryError: a directory of the key is absent.
        :raises UnsafeStorageError: one is a symlink or special file.
        """
        parent, _, name = validate_key(key).rpartition("/")
        return safefs.open_dir(self._root_fd, parent, create=create, durable=durable), name

    def get(self, key: str) -> bytes:
        # os-level calls: this runs per chunk on restores, and pathlib's open()
        # builds a buffered file object per call (a third of a warm restore here).
        try:
            dir_fd, name = self._parent(key)
            with owned_fd(dir_fd):
                return safefs.read_file_at(dir_fd, name)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as exc:
            raise ObjectNotFoundError(f"no object {key!r} in {self.root}") from exc
        except OSError as exc:
            _fail("cannot read", self.root / key, exc)

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        check_range(offset, length)
        try:
            dir_fd, name = self._parent(key)
            with owned_fd(dir_fd), owned_fd(safefs.open_file_at(dir_fd, name)) as fd:
                parts: list[bytes] = []
                got = 0
                while got < length:  # pread may return less than asked
                    part = os.pread(fd, length - got, offset + got)
                    if not part:
                        break
                    parts.append(part)
                    got += len(part)
                return parts[0] if len(parts) == 1 else b"".join(parts)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as exc:
            raise ObjectNotFoundError(f"no object {key!r} in {self.root}") from exc
        except OSError as exc:
            _fail("cannot read", self.root / key, exc)

    def put(self, key: str, data: bytes, *, overwrite: bool, durable: bool = True) -> bool:
        if not durable:
            # Recorded before the write: a sync racing with it covers it or flushes all.
            self._track(key, file=True)
        try:
            dir_fd, name = self._parent(key, create=True, durable=durable)
            with owned_fd(dir_fd):
                return safefs.atomic_write_at(
                    dir_fd, name, data, overwrite=overwrite, durable=durable
                )
        except OSError as exc:
            _fail("cannot write", self.root / key, exc)

    def _track(self, key: str, *, file: bool) -> None:
        """Remember what ``sync`` must flush for ``key`` (a put without fsync, a delete)."""
        with self._sync_lock:
            if self._untracked:
                return
            if file:
                self._dirty_files.add(key)
            # Every ancestor: the put may have created them without fsyncing their parents.
            parent = key.rpartition("/")[0]
            while True:
                self._dirty_dirs.add(parent)
                if not parent or not file:
                    break
                parent = parent.rpartition("/")[0]
            if len(self._dirty_files) + len(self._dirty_dirs) > SYNC_TRACKED:
                self._untracked = True
                self._dirty_files.clear()
                self._dirty_dirs.clear()

    def _lstat(self, key: str) -> os.stat_result | None:
        """The object's lstat, None if absent; a symlink or special file is refused."""
        try:
            dir_fd, name = self._parent(key)
        except (FileNotFoundError, NotADirectoryError):
            return None
        with owned_fd(dir_fd):
            st = safefs.stat_at(dir_fd, name)
        if st is None or stat.S_ISDIR(st.st_mode):
            return None
        if not stat.S_ISREG(st.st_mode):
            raise UnsafeStorageError(
                f"refusing {key!r} in {self.root}: not a regular file (a symlink?)"
            )
        return st

    def exists(self, key: str) -> bool:
        try:
            return self._lstat(key) is not None
        except OSError as exc:
            _fail("cannot stat", self.root / key, exc)

    def stat(self, key: str) -> ObjectInfo:
        try:
            st = self._lstat(key)
        except OSError as exc:
            _fail("cannot stat", self.root / key, exc)
        if st is None:
            raise ObjectNotFoundError(f"no object {key!r} in {self.root}")
        return ObjectInfo(st.st_size, st.st_mtime)

    def delete(self, key: str) -> None:
        self._track(key, file=False)
        try:
            dir_fd, name = self._parent(key)
            with owned_fd(dir_fd):
                # unlink(2) removes a symlink itself, never its target.
                os.unlink(name, dir_fd=dir_fd)
        except (FileNotFoundError, NotADirectoryError):
            return
        except OSError as exc:
            _fail("cannot delete", self.root / key, exc)

    def list(self, prefix: str = "") -> Iterator[str]:
        # Start at the deepest directory the prefix names completely. Directories
        # still to visit are kept as key prefixes, not fds (a wide store would
        # run out of them), and each is opened from the root again, no symlinks.
        base, _, _ = prefix.rpartition("/")
        stack = [f"{base}/" if base else ""]
        while stack:
            key_prefix = stack.pop()
            try:
                dir_fd = safefs.open_dir(self._root_fd, key_prefix.rstrip("/"))
            except (FileNotFoundError, NotADirectoryError):
                continue  # removed meanwhile
            except OSError as exc:
                _fail("cannot list", self.root / key_prefix, exc)
            with owned_fd(dir_fd):  # open while entries are asked (DT_UNKNOWN: fstatat)
                try:
                    entries = safefs.listdir_at(dir_fd)
                except OSError as exc:
                    _fail("cannot list", self.root / key_prefix, exc)
                for entry in entries:
                    if entry.name.startswith("."):
                        continue
                    key = key_prefix + entry.name
                    if entry.is_dir(follow_symlinks=False):
                        if key.startswith(prefix) or prefix.startswith(key + "/"):
                            stack.append(key + "/")
                    elif entry.is_file(follow_symlinks=False) and key.startswith(prefix):
                        yield key

    def sync(self) -> None:
        with self._sync_lock:
            files, dirs, untracked = self._dirty_files, self._dirty_dirs, self._untracked
            self._dirty_files, self._dirty_dirs, self._untracked = set(), set(), False
        if untracked:
            if _syncfs(self._root_fd) != 0:
                err = ctypes.get_errno()
                _fail("cannot sync", self.root, OSError(err, os.strerror(err)))
            return
        try:
            for key in sorted(files):
                self._fsync_key(key, directory=False)
            # Deepest first: a directory's entry is made durable after its content.
            for key in sorted(dirs, key=lambda d: -d.count("/") - bool(d)):
                self._fsync_key(key, directory=True)
        except OSError as exc:
            with self._sync_lock:  # not flushed: the next sync tries everything again
                self._untracked = True
            _fail("cannot sync", self.root, exc)

    def _fsync_key(self, key: str, *, directory: bool) -> None:
        try:
            if directory:
                fd = safefs.open_dir(self._root_fd, key)
            else:
                dir_fd, name = self._parent(key)
                with owned_fd(dir_fd):
                    # Threat: a symlink or FIFO swapped in for the key. O_NOFOLLOW
                    # refuses the one, O_NONBLOCK keeps the other from blocking.
                    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK
                                 | os.O_CLOEXEC, dir_fd=dir_fd)
        except (FileNotFoundError, NotADirectoryError):
            return  # deleted since: nothing of it to make durable
        with owned_fd(fd):
            if directory or stat.S_ISREG(os.fstat(fd).st_mode):
                os.fsync(fd)


def _load_syncfs() -> ctypes._NamedFuncPointer | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.syncfs
    except (OSError, AttributeError):
        return None


_SYNCFS = _load_syncfs()


def _syncfs(fd: int) -> int:
    if _SYNCFS is None:
        os.sync()
        return 0
    return int(_SYNCFS(fd))
