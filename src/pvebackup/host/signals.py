"""Turn SIGINT and SIGTERM into :class:`AbortedError` in the main thread.

A backup job must still clean up when it is interrupted: tear down NBD exports
and qemu-storage-daemon, unmount, remove temporary files, and tell the provider
(``backup_abort``, ``job_abort``). Python's default SIGTERM action kills the
process without running any of that, so the job installs handlers that raise
:class:`AbortedError` where the main thread is; ``finally`` blocks and context
managers then do the cleanup. Only the first signal raises: further ones during
cleanup are noted and ignored, so that cleanup itself is not interrupted.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import FrameType

from pvebackup.api.errors import AbortedError

__all__ = ["AbortState", "abort_on_signals"]

_Handler = Callable[[int, FrameType | None], object] | int | signal.Handlers | None


@dataclass
class AbortState:
    """What happened while the handlers were installed."""

    received: list[str] = field(default_factory=list)

    @property
    def aborted(self) -> bool:
        return bool(self.received)


@contextmanager
def abort_on_signals(
    signals: tuple[signal.Signals, ...] = (signal.SIGINT, signal.SIGTERM),
) -> Iterator[AbortState]:
    """Within the block, the first of ``signals`` raises ``AbortedError``.

    Outside the main thread (where Python cannot install handlers) this does
    nothing. The previous handlers are restored on exit.
    """
    state = AbortState()
    if threading.current_thread() is not threading.main_thread():
        yield state
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        state.received.append(name)
        if len(state.received) == 1:
            raise AbortedError(f"interrupted by {name}")

    previous: dict[signal.Signals, _Handler] = {}
    try:
        for sig in signals:
            previous[sig] = signal.signal(sig, handler)
        yield state
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
