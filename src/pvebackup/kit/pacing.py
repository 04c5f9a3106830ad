"""Pacing and progress of one transfer: the bandwidth limit and the progress lines.

Every provider paces what it reads with one :class:`TokenBucket` (the seed's
``bandwidth_limit``, bytes per second) and reports with one :class:`ProgressLog`
(percent, MiB/s, every few seconds and once at the end), so that the same limit
and the same task log look alike whatever provider runs. :class:`PacedReader`
applies both to a file copied with ``read(n)`` (a container's files);
:func:`paced_reader` and :class:`PacedWriter` apply the limit alone to a byte
stream (a container restore's tar stream).
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from typing import BinaryIO, Protocol

from pvebackup.api.types import LogFunction
from pvebackup.kit.crashpoint import crash_point

__all__ = [
    "MIB",
    "PROGRESS_INTERVAL",
    "PacedReader",
    "PacedWriter",
    "ProgressLog",
    "ProgressSink",
    "TokenBucket",
    "paced_reader",
    "progress_text",
]

MIB = 1024 * 1024
PROGRESS_INTERVAL = 5.0
"""Seconds between two progress lines."""


class TokenBucket:
    """Allow ``rate`` bytes per second on average, bursts of at most ``burst`` bytes.

    Call :meth:`consume` with the size of a read *before* issuing it. It takes the
    bytes at once and, when that drives the balance negative, sleeps until it is
    paid back, so reads average out to ``rate``; a read larger than the burst is
    simply paid with a longer sleep (no deadlock). Idle time refills the bucket
    only up to ``burst``: a pause does not buy a long burst later.
    ``rate`` ``None`` or ``0`` means unlimited: :meth:`consume` returns at once.
    """

    def __init__(
        self,
        rate: int | None,
        burst: int | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.rate = rate if rate and rate > 0 else None
        # A quarter of a second's worth: smooth enough, and small requests never wait
        # on an idle link.
        self.burst = burst if burst is not None else max(1, (self.rate or 0) // 4)
        self._clock = clock
        self._sleep = sleep
        self._tokens = float(self.burst)
        self._stamp = clock()
        self.waited = 0.0
        """Seconds spent sleeping so far."""

    def consume(self, amount: int) -> None:
        """Take ``amount`` bytes from the bucket, sleeping as long as needed."""
        if self.rate is None or amount <= 0:
            return
        now = self._clock()
        self._tokens = min(float(self.burst), self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now
        # Take the bytes now and pay the debt by sleeping: the next refill counts the
        # sleep, so the average stays at ``rate`` without a retry loop.
        self._tokens -= amount
        if self._tokens < 0:
            delay = -self._tokens / self.rate
            self.waited += delay
            self._sleep(delay)


def progress_text(
    what: str, done: int, total: int | None, elapsed: float, *, final: bool = False
) -> str:
    """``<what>: N% (x of y MiB) in t s, z MiB/s``: one formula for the log lines and
    the terminal's progress bar, so that both show the same numbers."""
    elapsed = max(elapsed, 1e-6)
    rate = done / MIB / elapsed
    took = f" in {elapsed:.1f} s" if final else ""
    if total is None:
        amount = f"{done / MIB:.1f} MiB"
    else:
        percent = 100 if final or total == 0 else done * 100 // total
        amount = f"{percent}% ({done / MIB:.1f} of {total / MIB:.1f} MiB)"
    return f"{what}: {amount}{took}, {rate:.1f} MiB/s"


class ProgressSink(Protocol):
    """What a ``log_function`` may offer besides being called: the host's log router
    draws a progress bar on a terminal from it. A provider need not know: its
    :class:`ProgressLog` finds the method on the log function, if there is one."""

    def progress(
        self, what: str, done: int, total: int | None, elapsed: float, line: str | None,
        final: bool,
    ) -> None:
        """Bytes ``done`` of ``total`` after ``elapsed`` seconds; ``line`` is the log
        line due now (None: none due), which the sink then logs itself."""


class ProgressLog:
    """Log ``<what>: N% (x of y MiB), z MiB/s`` every ``interval`` seconds and at the end.

    With ``total`` None (a directory walk does not know its size beforehand) the
    lines say ``x MiB`` without a percentage. ``detail``, when given, is called
    for each line and its text appended (a provider's own counters). A log function
    with a ``progress`` method (:class:`ProgressSink`) hears of every update and
    is handed the lines to log.
    """

    def __init__(
        self,
        log_function: LogFunction,
        what: str,
        total: int | None,
        *,
        interval: float = PROGRESS_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
        detail: Callable[[], str] | None = None,
    ) -> None:
        self._log = log_function
        self._what = what
        self.total = total
        self._interval = interval
        self._clock = clock
        self._detail = detail
        self._start = clock()
        self._next = self._start + interval
        self.done = 0
        sink = getattr(log_function, "progress", None)
        self._sink: Callable[..., None] | None = sink if callable(sink) else None

    def advance(self, nbytes: int) -> None:
        """Count ``nbytes`` more as done; log a line if the interval has passed."""
        self.update(self.done + nbytes)

    def update(self, done: int) -> None:
        """Set the bytes done so far; log a line if the interval has passed."""
        self.done = done
        now = self._clock()
        # No periodic line at 100 %: the final line says it, with the time taken.
        if now >= self._next and (self.total is None or self.done < self.total):
            self._next = now + self._interval
            self._emit(now)
        elif self._sink is not None:
            self._sink(self._what, self.done, self.total, now - self._start, None, False)

    def finish(self) -> None:
        """Log the final line: 100 %, the time taken and the average rate."""
        self._emit(self._clock(), final=True)

    def _emit(self, now: float, final: bool = False) -> None:
        elapsed = now - self._start
        text = progress_text(self._what, self.done, self.total, elapsed, final=final)
        detail = f", {self._detail()}" if self._detail is not None else ""
        if self._sink is not None:
            self._sink(self._what, self.done, self.total, elapsed, text + detail, final)
        else:
            self._log("info", text + detail)


class PacedReader:
    """A read-only file wrapper that pays ``limiter`` and feeds ``progress`` per read.

    Hand it to anything that copies with ``read(n)`` (``tarfile.addfile``,
    ``shutil.copyfileobj``) to rate-limit and count that copy.
    """

    def __init__(self, source: BinaryIO, limiter: TokenBucket, progress: ProgressLog) -> None:
        self._source = source
        self._limiter = limiter
        self._progress = progress

    def read(self, size: int = -1) -> bytes:
        """Read up to ``size`` bytes (``-1``: the rest), within the limit."""
        if size < 0:
            data = self._source.read()
            self._limiter.consume(len(data))
        else:
            self._limiter.consume(size)
            data = self._source.read(size)
        self._progress.advance(len(data))
        crash_point("backup-mid-read")
        return data


class _PacedRaw(io.RawIOBase):
    def __init__(self, source: BinaryIO, limiter: TokenBucket) -> None:
        super().__init__()
        self._source = source
        self._limiter = limiter

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        self._limiter.consume(len(buffer))
        data = self._source.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


def paced_reader(source: BinaryIO, limiter: TokenBucket, buffer_size: int = 1 << 16) -> BinaryIO:
    """``source`` read within ``limiter`` (buffered, with ``peek``); closing it
    leaves ``source`` open."""
    return io.BufferedReader(_PacedRaw(source, limiter), buffer_size)


class PacedWriter:
    """A write-only wrapper that pays ``limiter`` before each write; ``after`` runs
    after each one (the writer of a pipe may have to serve its reader's messages)."""

    def __init__(
        self, target: BinaryIO, limiter: TokenBucket, after: Callable[[], None] = lambda: None
    ) -> None:
        self._target = target
        self._limiter = limiter
        self._after = after

    def write(self, data: bytes) -> int:
        self._limiter.consume(len(data))
        written = self._target.write(data)
        self._after()
        return written

    def flush(self) -> None:
        self._target.flush()
