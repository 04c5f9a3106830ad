"""Pacing and progress of one transfer: a bandwidth limit and periodic progress lines.

Both backup mechanisms use these: ``backup_nbd`` for the bytes it reads from the
export, ``backup_directory`` for the bytes it reads from the container's files.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import BinaryIO

from pvebackup.api.types import LogFunction
from pvebackup.kit.crashpoint import crash_point

__all__ = ["MIB", "ProgressLog", "LimitedReader", "RateLimiter"]

MIB = 1024 * 1024


class RateLimiter:
    """Keep reads at or below ``rate`` bytes per second on average.

    Call :meth:`acquire` with the size of a read *before* issuing it. Each read
    moves a deadline forward by ``nbytes / rate`` and ``acquire`` sleeps until
    that deadline, so after ``N`` bytes at least ``N / rate`` seconds have passed
    (minus one small burst allowance). A read larger than the burst is allowed and
    simply paid for with a longer sleep, so huge reads cannot deadlock the limiter.
    """

    def __init__(
        self,
        rate: int | None,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        """:param rate: bytes per second; ``None`` or ``0`` means unlimited."""
        self.rate = rate if rate else None
        self._clock = clock
        self._sleep = sleep
        self._deadline: float | None = None

    def acquire(self, nbytes: int) -> None:
        """Wait until reading ``nbytes`` more keeps the average within the limit."""
        if self.rate is None:
            return
        now = self._clock()
        if self._deadline is None or self._deadline < now:
            # Idle time is not saved up: a pause does not buy a later burst.
            self._deadline = now
        self._deadline += nbytes / self.rate
        delay = self._deadline - now
        if delay > 0:
            self._sleep(delay)


class ProgressLog:
    """Log ``<what>: N% (x of y MiB), z MiB/s`` every ``interval`` seconds and at the end.

    With ``total`` None (a directory walk does not know its size beforehand) the
    lines say ``x MiB`` without a percentage.
    """

    def __init__(
        self,
        log_function: LogFunction,
        what: str,
        total: int | None,
        *,
        interval: float = 3.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._log = log_function
        self._what = what
        self._total = total
        self._interval = interval
        self._clock = clock
        self._start = clock()
        self._next = self._start + interval
        self.done = 0

    def advance(self, nbytes: int) -> None:
        """Count ``nbytes`` as done and log a line if the interval has passed."""
        self.done += nbytes
        now = self._clock()
        if now >= self._next and (self._total is None or self.done < self._total):
            self._next = now + self._interval
            self._emit(now)

    def finish(self) -> None:
        """Log the final 100 % line with the average rate."""
        self._emit(self._clock(), final=True)

    def _emit(self, now: float, final: bool = False) -> None:
        elapsed = max(now - self._start, 1e-6)
        rate = self.done / MIB / elapsed
        took = f" in {elapsed:.1f} s" if final else ""
        if self._total is None:
            amount = f"{self.done / MIB:.1f} MiB"
        else:
            percent = 100 if final or self._total == 0 else self.done * 100 // self._total
            amount = f"{percent}% ({self.done / MIB:.1f} of {self._total / MIB:.1f} MiB)"
        self._log("info", f"{self._what}: {amount}{took}, {rate:.1f} MiB/s")



class LimitedReader:
    """A read-only file wrapper that pays ``limiter`` and feeds ``progress`` per read.

    Hand it to anything that copies with ``read(n)`` (``tarfile.addfile``,
    ``shutil.copyfileobj``) to rate-limit and count that copy.
    """

    def __init__(self, source: BinaryIO, limiter: RateLimiter, progress: ProgressLog) -> None:
        self._source = source
        self._limiter = limiter
        self._progress = progress

    def read(self, size: int = -1) -> bytes:
        """Read up to ``size`` bytes (``-1``: the rest), within the limit."""
        if size < 0:
            data = self._source.read()
            self._limiter.acquire(len(data))
        else:
            self._limiter.acquire(size)
            data = self._source.read(size)
        self._progress.advance(len(data))
        crash_point("backup-mid-read")
        return data
