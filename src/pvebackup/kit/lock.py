"""``flock`` locks that die with their holder, and that say who holds them.

A lock file is opened ``O_CLOEXEC`` (children never inherit it, so an orphaned
child cannot keep a dead run's lock) and locked with ``flock(LOCK_EX|LOCK_NB)``:
a second taker fails at once instead of queueing behind a backup that may run for
hours. The kernel drops the lock with the last descriptor, so a run killed with
SIGKILL leaves no stale lock behind; what it leaves is its holder record, which the
next holder overwrites.

The holder record (one line: PID, kernel start time, command) is only for the
message of the refused taker ("locked by PID N"); the lock itself is the flock.
Directories are locked the same way (``flock`` on an ``O_DIRECTORY`` descriptor),
which is how a provider marks a temporary directory as being written.
"""

from __future__ import annotations

import errno
import fcntl
import os
import sys
import time
from pathlib import Path
from types import TracebackType

from pvebackup.api.errors import LockedError
from pvebackup.kit.oserrors import os_error

from .proc import process_start_time

__all__ = ["FileLock", "lock_descriptor", "lock_directory", "try_lock_directory"]

_HOLDER_MAX = 4096


class FileLock:
    """An exclusive ``flock`` on ``path``, taken at once or refused.

    :param what: how the message names the locked thing ("guest 100").
    """

    def __init__(self, path: Path, *, what: str) -> None:
        self.path = path
        self.what = what
        self._fd = -1

    @property
    def held(self) -> bool:
        return self._fd >= 0

    def acquire(self) -> FileLock:
        """Take the lock and record us as its holder.

        :raises LockedError: another process holds it; the message names its PID.
        :raises PveBackupError: the lock file cannot be created.
        """
        if self._fd >= 0:
            raise RuntimeError(f"{self.path} is locked already")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            # O_NOFOLLOW: a symlink planted at the lock path must not make us
            # truncate the file it points to.
            fd = os.open(
                self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
            )
        except OSError as exc:
            raise os_error(exc, f"cannot open lock file {self.path}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise LockedError(f"{self.what} is {self._holder_text()}") from exc
            raise os_error(exc, f"cannot lock {self.path}") from exc
        try:
            start = process_start_time(os.getpid())
            cmd = " ".join(sys.argv)[:200].replace("\n", " ")
            record = f"{os.getpid()} {start if start is not None else -1} {cmd}\n".encode()
            os.ftruncate(fd, 0)
            os.pwrite(fd, record, 0)
        except OSError as exc:
            os.close(fd)
            raise os_error(exc, f"cannot write lock file {self.path}") from exc
        self._fd = fd
        return self

    def _holder_text(self) -> str:
        # The holder writes its record just after taking the lock: give it a moment.
        for _ in range(20):
            try:
                with open(self.path, "rb") as f:
                    text = f.read(_HOLDER_MAX).decode(errors="replace")
            except OSError:
                text = ""
            pid, _, rest = text.strip().partition(" ")
            if pid.isdigit():
                cmd = rest.partition(" ")[2].strip()
                return f"locked by PID {pid}" + (f" ({cmd})" if cmd else "")
            time.sleep(0.01)
        return "locked by another process"

    def release(self) -> None:
        """Drop the lock (the record stays; the next holder overwrites it)."""
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    def __enter__(self) -> FileLock:
        return self.acquire()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


def lock_descriptor(fd: int, *, what: str) -> None:
    """Lock the open file or directory ``fd`` exclusively, at once or not at all.

    The lock lasts until the last descriptor of that open file is closed.

    :raises LockedError: someone else holds it.
    """
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise LockedError(f"{what} is locked by another process") from exc
        raise


def lock_directory(path: Path) -> int:
    """Lock directory ``path`` exclusively; return the descriptor that holds the lock.

    Closing the descriptor (or dying) drops the lock.

    :raises LockedError: someone else holds it.
    :raises OSError: it cannot be opened (a symlink is refused).
    """
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        lock_descriptor(fd, what=str(path))
    except BaseException:
        os.close(fd)
        raise
    return fd


def try_lock_directory(path: Path) -> int | None:
    """Like :func:`lock_directory`, but None when it is locked, missing or no directory."""
    try:
        return lock_directory(path)
    except (LockedError, OSError):
        return None
