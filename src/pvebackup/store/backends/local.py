"""A store in a local directory: one file per key, ``/`` in keys are directories.

Every ``put`` writes a temporary file (``.tmp-*``, in the target's directory, so on
the same filesystem), fsyncs it when durable, and then publishes it:
``os.link`` for ``overwrite=False`` (fails with EEXIST if the key exists: an atomic
no-overwrite insert, so two processes inserting the same chunk both succeed) or
``os.replace`` for ``overwrite=True``; then it fsyncs the directory. The temporary
file is always removed. ``sync`` calls ``syncfs(2)`` on the store's filesystem, so
a batch of non-durable puts costs one flush instead of two fsyncs each.

OSError mapping: ENOENT on read is ``ObjectNotFoundError``; EINTR, EAGAIN, EBUSY,
ETIMEDOUT, ESTALE are ``TransientBackendError``; everything else (ENOSPC, EDQUOT,
EACCES, EPERM, EROFS, EIO, ...) is ``PermanentBackendError``.
"""

from __future__ import annotations

import ctypes
import errno
import os
import secrets
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

from pvebackup.api.errors import (
    ObjectNotFoundError,
    PermanentBackendError,
    TransientBackendError,
)
from pvebackup.store.backends.base import ObjectInfo, validate_key

__all__ = ["LocalBackend"]

_TRANSIENT = frozenset({errno.EINTR, errno.EAGAIN, errno.EBUSY, errno.ETIMEDOUT, errno.ESTALE})
_TMP_PREFIX = ".tmp-"


def _fail(what: str, path: Path, exc: OSError) -> NoReturn:
    msg = f"{what} {path}: {exc.strerror or exc}"
    if exc.errno in _TRANSIENT:
        raise TransientBackendError(msg) from exc
    raise PermanentBackendError(msg) from exc


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LocalBackend:
    """A backend over the directory ``root`` (created if missing)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self._dirs: set[Path] = set()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            _fail("cannot create store directory", self.root, exc)

    def __repr__(self) -> str:
        return f"LocalBackend({str(self.root)!r})"

    def _path(self, key: str) -> Path:
        return self.root / validate_key(key)

    def get(self, key: str) -> bytes:
        # os-level calls: this runs per chunk on restores, and pathlib's open()
        # builds a buffered file object per call (a third of a warm restore here).
        path = self._path(key)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode):
                    raise IsADirectoryError(path)
                parts = [os.read(fd, st.st_size)]
                while True:  # a short read, or an object longer than it was
                    more = os.read(fd, 1 << 20)
                    if not more:
                        break
                    parts.append(more)
            finally:
                os.close(fd)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as exc:
            raise ObjectNotFoundError(f"no object {key!r} in {self.root}") from exc
        except OSError as exc:
            _fail("cannot read", path, exc)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _make_parents(self, parent: Path, durable: bool) -> None:
        # Directories are never removed behind our back while a store is open, so
        # the ones seen once need no more system calls (a stat per chunk adds up).
        if parent in self._dirs:
            return
        missing: list[Path] = []
        p = parent
        while not p.is_dir():
            missing.append(p)
            p = p.parent
        if missing:
            parent.mkdir(parents=True, exist_ok=True)
            if durable:
                # A new directory is durable only once its own parent is synced.
                for d in missing:
                    _fsync_dir(d.parent)
        self._dirs.add(parent)

    def put(self, key: str, data: bytes, *, overwrite: bool, durable: bool = True) -> bool:
        path = self._path(key)
        if not overwrite and path.exists():
            return False
        tmp = path.with_name(f"{_TMP_PREFIX}{path.name}.{secrets.token_hex(6)}")
        try:
            self._make_parents(path.parent, durable)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            try:
                with memoryview(data) as view:
                    written = 0
                    while written < len(view):
                        written += os.write(fd, view[written:])
                if durable:
                    os.fsync(fd)
            finally:
                os.close(fd)
            if overwrite:
                os.replace(tmp, path)
            else:
                try:
                    os.link(tmp, path)
                except FileExistsError:
                    return False
            if durable:
                _fsync_dir(path.parent)
            return True
        except OSError as exc:
            _fail("cannot write", path, exc)
        finally:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            except OSError:
                pass  # an unremovable temp file is harmless: list() never shows it

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def stat(self, key: str) -> ObjectInfo:
        path = self._path(key)
        try:
            st = os.stat(path)
        except (FileNotFoundError, NotADirectoryError) as exc:
            raise ObjectNotFoundError(f"no object {key!r} in {self.root}") from exc
        except OSError as exc:
            _fail("cannot stat", path, exc)
        if not stat.S_ISREG(st.st_mode):
            raise ObjectNotFoundError(f"no object {key!r} in {self.root}")
        return ObjectInfo(st.st_size, st.st_mtime)

    def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            path.unlink()
        except (FileNotFoundError, NotADirectoryError):
            return
        except OSError as exc:
            _fail("cannot delete", path, exc)

    def list(self, prefix: str = "") -> Iterator[str]:
        # Start at the deepest directory the prefix names completely.
        base, _, _ = prefix.rpartition("/")
        start = self.root / base if base else self.root
        stack: list[tuple[Path, str]] = [(start, f"{base}/" if base else "")]
        while stack:
            directory, key_prefix = stack.pop()
            try:
                entries = list(os.scandir(directory))
            except (FileNotFoundError, NotADirectoryError):
                continue
            except OSError as exc:
                _fail("cannot list", directory, exc)
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                key = key_prefix + entry.name
                if entry.is_dir(follow_symlinks=False):
                    if key.startswith(prefix) or prefix.startswith(key + "/"):
                        stack.append((Path(entry.path), key + "/"))
                elif key.startswith(prefix):
                    yield key

    def sync(self) -> None:
        try:
            fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            _fail("cannot open", self.root, exc)
        try:
            if _syncfs(fd) != 0:
                err = ctypes.get_errno()
                _fail("cannot sync", self.root, OSError(err, os.strerror(err)))
        finally:
            os.close(fd)


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
