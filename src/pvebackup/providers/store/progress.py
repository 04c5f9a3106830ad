"""What one disk backup did (new, reused, zero bytes), for the progress lines and the log.

The lines themselves are :class:`pvebackup.kit.pacing.ProgressLog`'s.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from pvebackup.kit.units import format_bytes

__all__ = ["BackupStats", "stats_detail"]


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


def stats_detail(stats: BackupStats) -> Callable[[], str]:
    """The store's counters for :class:`pvebackup.kit.pacing.ProgressLog`'s lines."""

    def detail() -> str:
        return (
            f"read {format_bytes(stats.read)}, new {format_bytes(stats.new)}"
            f" (stored {format_bytes(stats.stored)}), reused {format_bytes(stats.reused)},"
            f" zero {format_bytes(stats.zero)}"
        )

    return detail
