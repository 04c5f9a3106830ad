"""Task logs and the provider's log_function (pvebackup.host.tasklog)."""

from __future__ import annotations

import io
import re
from pathlib import Path

from pvebackup.host.tasklog import LogRouter, TaskLog


def test_levels_are_written_like_vzdump(tmp_path: Path) -> None:
    terminal = io.StringIO()
    router = LogRouter(terminal)
    log = TaskLog(tmp_path / "logs/qemu-100.log")
    router.current = log
    router("info", "starting")
    router("warn", "careful")
    router("err", "broken\nsecond line")
    router.current = None
    router("info", "not in the task log")
    log.close()
    lines = (tmp_path / "logs/qemu-100.log").read_text().splitlines()
    stamp = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d"
    assert [re.sub(stamp, "T", line) for line in lines] == [
        "T INFO: starting",
        "T WARN: careful",
        "T ERROR: broken",
        "T ERROR: second line",
    ]
    assert terminal.getvalue().splitlines() == [
        "INFO: starting",
        "WARN: careful",
        "ERROR: broken",
        "ERROR: second line",
        "INFO: not in the task log",
    ]


def test_unknown_level_is_shown_not_dropped(tmp_path: Path) -> None:
    terminal = io.StringIO()
    LogRouter(terminal)("debug", "x")
    assert terminal.getvalue() == "DEBUG: x\n"


def test_writes_after_close_are_ignored(tmp_path: Path) -> None:
    with TaskLog(tmp_path / "a.log") as log:
        log.write("info", "one")
    log.write("info", "two")
    assert (tmp_path / "a.log").read_text().count("INFO") == 1
