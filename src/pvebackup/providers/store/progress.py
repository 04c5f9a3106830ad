"""Progress lines for the task log: percent, throughput, new and reused bytes."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from pvebackup.api.types import LogFunction
from pvebackup.kit.units import format_bytes

__all__ = ["BackupStats", "ProgressLog"]


@dataclass(slots=True)
class BackupStats:
    """What one disk's backup did, in bytes.

    :ivar done: bytes of the disk processed so far (of ``total``).
    :ivar read: bytes read over NBD.
    :ivar new: plaintext bytes of chunks that were not in the store yet.
    :ivar stored: bytes written to the store for them (compressed, encrypted).
    :ivar reused: plaintext bytes of chunks the store already held, or that were
        unchanged since the previous backup (incremental).
    :ivar zero: bytes of zero chunks (never stored).
    """

    total: int = 0
    done: int = 0
    read: int = 0
    new: int = 0
    stored: int = 0
    reused: int = 0
    zero: int = 0


class ProgressLog:
    """Writes a progress line every ``interval`` seconds, and a summary at the end."""

    def __init__(
        self,
        log: LogFunction,
        name: str,
        stats: BackupStats,
        *,
        interval: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._log = log
        self._name = name
        self._stats = stats
        self._interval = interval
        self._clock = clock
        self._start = clock()
        self._next = self._start + interval

    def _line(self) -> str:
        s = self._stats
        elapsed = max(self._clock() - self._start, 1e-6)
        percent = 100.0 * s.done / s.total if s.total else 100.0
        return (
            f"{self._name}: {percent:.0f}% ({format_bytes(s.done)} of {format_bytes(s.total)}),"
            f" read {format_bytes(s.read)} at {format_bytes(s.read / elapsed)}/s,"
            f" new {format_bytes(s.new)} (stored {format_bytes(s.stored)}),"
            f" reused {format_bytes(s.reused)}, zero {format_bytes(s.zero)}"
        )

    def tick(self) -> None:
        """Log a line if ``interval`` has passed since the last one."""
        now = self._clock()
        if now >= self._next:
            self._next = now + self._interval
            self._log("info", self._line())

    def finish(self) -> None:
        """Log the summary line."""
        elapsed = self._clock() - self._start
        self._log("info", f"{self._line()}; done in {elapsed:.1f} s")
