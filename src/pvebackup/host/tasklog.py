"""Task logs: one log file per guest backup, plus the terminal.

Lines look like vzdump's (``2024-07-23 11:56:11 INFO: starting backup``); the
terminal gets the same line without the date. ``log_function(level, message)``
of a provider is a :class:`LogRouter`: it writes to the task log of the guest
being backed up (if any) and to the terminal, so a provider's messages end up
where an operator looks, and in the log file handed to
``backup_handle_log_file``.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    from .progress import ProgressDisplay

__all__ = ["LEVEL_LABELS", "LogRouter", "TaskLog"]

LEVEL_LABELS: dict[str, str] = {"info": "INFO", "warn": "WARN", "err": "ERROR"}
"""Prefix written for each of the seed's three log levels."""


def _label(level: str) -> str:
    # An unknown level from a provider is still shown, never dropped.
    return LEVEL_LABELS.get(str(level), str(level).upper() or "INFO")


class TaskLog:
    """The task log file of one guest backup. Thread safe; a context manager."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fh: TextIO | None = open(path, "w", encoding="utf-8")
        self._lock = threading.Lock()

    def write(self, level: str, message: str) -> None:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        label = _label(level)
        with self._lock:
            if self._fh is None:
                return
            for line in str(message).splitlines() or [""]:
                self._fh.write(f"{stamp} {label}: {line}\n")
            self._fh.flush()

    def close(self) -> None:
        with self._lock:
            if self._fh is not None:
                self._fh.close()
                self._fh = None

    def __enter__(self) -> TaskLog:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class LogRouter:
    """The ``log_function`` given to providers, also used by the host itself.

    Writes ``LEVEL: message`` to ``terminal`` and, while a guest is being backed
    up (:attr:`current` set), the stamped line to that guest's :class:`TaskLog`.
    With a :attr:`display` (a terminal), lines are printed above its progress
    bars and periodic progress lines go to the task log only
    (:meth:`progress`, the :class:`~pvebackup.kit.pacing.ProgressSink` of
    providers' progress).
    """

    def __init__(self, terminal: TextIO | None) -> None:
        self.terminal = terminal
        self.current: TaskLog | None = None
        self.display: ProgressDisplay | None = None
        self._lock = threading.Lock()

    def __call__(self, level: str, message: str) -> None:
        current = self.current
        if current is not None:
            current.write(level, message)
        self._to_terminal(level, message)

    def _to_terminal(self, level: str, message: str) -> None:
        if self.terminal is None:
            return
        label = _label(level)
        display = self.display
        with self._lock:
            for line in str(message).splitlines() or [""]:
                if display is not None:
                    display.print(f"{label}: {line}")
                else:
                    self.terminal.write(f"{label}: {line}\n")
            if display is None:
                self.terminal.flush()

    def progress(
        self, what: str, done: int, total: int | None, elapsed: float, line: str | None,
        final: bool,
    ) -> None:
        display = self.display
        if display is not None:
            display.update(what, done, total, elapsed, final)
        if line is None:
            return
        current = self.current
        if current is not None:
            current.write("info", line)
        if display is None or final:
            self._to_terminal("info", line)

    def info(self, message: str) -> None:
        self("info", message)

    def warn(self, message: str) -> None:
        self("warn", message)

    def err(self, message: str) -> None:
        self("err", message)
