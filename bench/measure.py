"""Timing, peak memory, cache dropping and disk usage for the benchmark.

Every timed command runs as a child process timed with ``time.perf_counter``. Peak
RSS is read from ``/proc/PID/status`` (``VmHWM``, the high-water mark of each
process) by polling the child and all its descendants, so the Python process of
``pvebackup`` and the ``qemu-storage-daemon`` it starts are reported apart.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "Measurement",
    "Timed",
    "ToolFailed",
    "disk_usage",
    "drop_caches",
    "keep_caches_warm",
    "run_timed",
]

DROP_CACHES = Path("/proc/sys/vm/drop_caches")
POLL_SECONDS = 0.05
_keep_warm = False


class ToolFailed(RuntimeError):
    """A measured command exited non-zero; the message holds its stderr tail."""


@dataclass(slots=True)
class Measurement:
    """All runs of one tool in one scenario, e.g. ("full", "borg lz4").

    ``seconds`` and ``size`` hold one value per run; the table shows medians.
    ``size`` is a byte count whose meaning depends on the scenario (repository
    size after a full backup, growth after an incremental). ``rss`` maps a process
    name to its peak RSS in bytes (maximum over runs). ``error`` is set when the
    tool could not be measured; then the lists may be empty.
    """

    scenario: str
    tool: str
    seconds: list[float] = field(default_factory=list)
    size: list[int] = field(default_factory=list)
    rss: dict[str, int] = field(default_factory=dict)
    error: str | None = None
    note: str = ""
    values: dict[str, float] = field(default_factory=dict)
    """Other figures of the measurement by name (e.g. ``lookups_per_s``), last run's."""

    @property
    def median_seconds(self) -> float | None:
        return statistics.median(self.seconds) if self.seconds else None

    @property
    def median_size(self) -> int | None:
        return int(statistics.median(self.size)) if self.size else None

    def add(self, timed: Timed, size: int | None = None) -> None:
        self.seconds.append(timed.seconds)
        if size is not None:
            self.size.append(size)
        for name, peak in timed.rss.items():
            self.rss[name] = max(self.rss.get(name, 0), peak)

    def as_json(self) -> dict[str, object]:
        return {
            "scenario": self.scenario,
            "tool": self.tool,
            "seconds": self.seconds,
            "median_seconds": self.median_seconds,
            "size": self.size,
            "median_size": self.median_size,
            "peak_rss": self.rss,
            "error": self.error,
            "note": self.note,
            "values": self.values,
        }


@dataclass(frozen=True, slots=True)
class Timed:
    """One timed command: wall seconds and peak RSS per process name (bytes)."""

    seconds: float
    rss: Mapping[str, int]
    stdout: str = ""


def keep_caches_warm() -> None:
    """From now on ``drop_caches`` only syncs (``--warm``: data stays in the page cache)."""
    global _keep_warm
    _keep_warm = True


def drop_caches() -> bool:
    """``sync`` and drop the page cache; False when not done (warm cache then)."""
    os.sync()
    if _keep_warm:
        return False
    try:
        DROP_CACHES.write_text("3\n")
    except OSError:
        return False
    return True


def disk_usage(path: Path) -> int:
    """Bytes allocated on disk below ``path`` (like ``du -s --block-size=1``)."""
    if not path.exists():
        return 0
    total = path.lstat().st_blocks * 512
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
            except FileNotFoundError:
                continue
    return total


def _parents() -> dict[int, tuple[int, str]]:
    """``pid -> (ppid, comm)`` of every process we can see."""
    table: dict[int, tuple[int, str]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        # comm is in parentheses and may contain spaces; ppid follows the state.
        comm = stat[stat.index("(") + 1 : stat.rindex(")")]
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        table[int(entry.name)] = (ppid, comm)
    return table


def _program(pid: int) -> str | None:
    """argv[0]'s basename of ``pid`` (comm is cut at 15 chars); None while it has none
    (a process being forked or exec'd, or a zombie)."""
    try:
        argv0 = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0", 1)[0]
    except OSError:
        return None
    return os.path.basename(argv0.decode(errors="replace")) or None


def _hwm(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class _RssMonitor(threading.Thread):
    """Polls the peak RSS of ``root`` and its descendants until stopped."""

    def __init__(self, root: int, root_name: str) -> None:
        super().__init__(daemon=True)
        self.root = root
        self.root_name = root_name
        self.peaks: dict[str, int] = {}
        self._stop_event = threading.Event()

    def _sample(self) -> None:
        table = _parents()
        tree = {self.root}
        changed = True
        while changed:
            changed = False
            for pid, (ppid, _) in table.items():
                if ppid in tree and pid not in tree:
                    tree.add(pid)
                    changed = True
        for pid in tree:
            peak = _hwm(pid)
            if peak is None:
                continue
            name = self.root_name if pid == self.root else _program(pid)
            if name is None:
                continue
            self.peaks[name] = max(self.peaks.get(name, 0), peak)

    def run(self) -> None:
        while not self._stop_event.is_set():
            self._sample()
            self._stop_event.wait(POLL_SECONDS)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


def run_timed(
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    monitor_rss: str | None = None,
    cold: bool = True,
    label: str | None = None,
) -> Timed:
    """Run ``argv``, return its wall time (and peak RSS when ``monitor_rss`` names it).

    With ``cold`` the page cache is dropped first (where permitted). ``label``
    names the command in errors (default: the program name).

    :raises ToolFailed: the command exited non-zero.
    """
    if cold:
        drop_caches()
    full_env = dict(os.environ)
    if env:
        full_env.update(env)
    start = time.perf_counter()
    proc = subprocess.Popen(
        list(argv),
        env=full_env,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    monitor = _RssMonitor(proc.pid, monitor_rss) if monitor_rss else None
    if monitor:
        monitor.start()
    stdout, stderr = proc.communicate()
    seconds = time.perf_counter() - start
    if monitor:
        monitor.stop()
    if proc.returncode != 0:
        tail = " | ".join(stderr.strip().splitlines()[-3:]) or stdout.strip()[-300:]
        raise ToolFailed(f"{label or Path(argv[0]).name} exited {proc.returncode}: {tail}")
    return Timed(seconds=seconds, rss=dict(monitor.peaks) if monitor else {}, stdout=stdout)
