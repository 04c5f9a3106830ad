"""The live progress bar of a job on a terminal (``rich``), beside the task log.

On a terminal the log lines scroll above one bar per transfer; the bar's text is
:func:`~pvebackup.kit.pacing.progress_text`, the formula of the log lines, so both
say the same numbers. The periodic progress lines then go to the task log only
(the final one of each transfer to both). Not on a terminal (cron, a task log
viewer, a pipe), or with ``TERM=dumb``, there is no bar and every line goes out
as vzdump prints it: :func:`wants_bar` decides.
"""

from __future__ import annotations

import os
import threading
from typing import TextIO

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn

from pvebackup.kit.pacing import progress_text

__all__ = ["ProgressDisplay", "wants_bar"]


def wants_bar(stream: TextIO | None) -> bool:
    if stream is None or os.environ.get("TERM") == "dumb":
        return False
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a closed or odd stream: no bar
        return False


class ProgressDisplay:
    """One bar per transfer (``what``), kept until :meth:`clear`. Thread safe."""

    def __init__(self, stream: TextIO, *, force_terminal: bool | None = None) -> None:
        self.console = Console(file=stream, force_terminal=force_terminal, highlight=False)
        self._progress = Progress(
            BarColumn(bar_width=30),
            TextColumn("{task.description}"),
            console=self.console,
            transient=True,
        )
        self._tasks: dict[str, TaskID] = {}
        self._lock = threading.Lock()
        self._started = False

    def start(self) -> None:
        self._progress.start()
        self._started = True

    def stop(self) -> None:
        if self._started:
            self._progress.stop()
            self._started = False

    def print(self, line: str) -> None:
        """A log line, above the bars."""
        self.console.print(line, markup=False, highlight=False, soft_wrap=True)

    def update(
        self, what: str, done: int, total: int | None, elapsed: float, final: bool
    ) -> None:
        text = progress_text(what, done, total, elapsed, final=final)
        with self._lock:
            task = self._tasks.get(what)
            if task is None:
                task = self._progress.add_task(text, total=total)
                self._tasks[what] = task
            self._progress.update(task, completed=done, total=total, description=text)

    def clear(self) -> None:
        """Drop the bars (a guest's transfers are done)."""
        with self._lock:
            for task in self._tasks.values():
                self._progress.remove_task(task)
            self._tasks.clear()
