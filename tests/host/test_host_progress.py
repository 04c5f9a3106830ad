"""Progress: a bar on a terminal, vzdump-style lines elsewhere, the same numbers."""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest
from sample_node import MiB, Node

from pvebackup.host.job import run_backup_job
from pvebackup.host.progress import ProgressDisplay, wants_bar
from pvebackup.host.tasklog import LogRouter, TaskLog
from pvebackup.kit.pacing import MIB, ProgressLog, progress_text


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_wants_bar_only_on_a_real_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TERM", "xterm")
    assert wants_bar(Tty()) and not wants_bar(io.StringIO()) and not wants_bar(None)
    monkeypatch.setenv("TERM", "dumb")
    assert not wants_bar(Tty())


def _transfer(log: object, clock: Clock) -> None:
    progress = ProgressLog(log, "drive-scsi0", 8 * MIB, interval=5.0, clock=clock)  # type: ignore[arg-type]
    for _ in range(8):
        clock.now += 2.0
        progress.advance(MIB)
    progress.finish()


def test_without_terminal_every_line_goes_out_as_vzdump_prints_it(tmp_path: Path) -> None:
    out = io.StringIO()
    router = LogRouter(out)
    router.current = TaskLog(tmp_path / "task.log")
    _transfer(router, Clock())
    router.current.close()
    lines = out.getvalue().splitlines()
    # periodic lines every 5 s (at 6, 12 s) and the final one, to both places
    assert lines == [
        "INFO: drive-scsi0: 37% (3.0 of 8.0 MiB), 0.5 MiB/s",
        "INFO: drive-scsi0: 75% (6.0 of 8.0 MiB), 0.5 MiB/s",
        "INFO: drive-scsi0: 100% (8.0 of 8.0 MiB) in 16.0 s, 0.5 MiB/s",
    ]
    logged = (tmp_path / "task.log").read_text().splitlines()
    assert [ln.split(" INFO: ")[1] for ln in logged] == [ln[6:] for ln in lines]


def test_on_a_terminal_a_bar_with_the_same_numbers(tmp_path: Path) -> None:
    term = io.StringIO()
    router = LogRouter(term)
    router.display = ProgressDisplay(term, force_terminal=True)
    router.current = TaskLog(tmp_path / "task.log")
    seen: list[str] = []
    update = router.display.update

    def spy(what: str, done: int, total: int | None, elapsed: float, final: bool) -> None:
        seen.append(progress_text(what, done, total, elapsed, final=final))
        update(what, done, total, elapsed, final)

    router.display.update = spy  # type: ignore[method-assign]
    router.display.start()
    router.info("Starting Backup of VM 100 (qemu)")
    _transfer(router, Clock())
    router.display.stop()
    router.current.close()
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", term.getvalue())
    # the task log keeps every line, the terminal only the final one beside the bar
    logged = (tmp_path / "task.log").read_text()
    assert "37% (3.0 of 8.0 MiB)" in logged and "100% (8.0 of 8.0 MiB)" in logged
    assert "INFO: drive-scsi0: 37%" not in text
    assert "INFO: drive-scsi0: 100% (8.0 of 8.0 MiB) in 16.0 s, 0.5 MiB/s" in text
    assert "INFO: Starting Backup of VM 100 (qemu)" in text
    # every update reached the bar, with the log lines' formula
    assert len(seen) == 9 and seen[0] == "drive-scsi0: 12% (1.0 of 8.0 MiB), 0.5 MiB/s"
    assert seen[-1] == "drive-scsi0: 100% (8.0 of 8.0 MiB) in 16.0 s, 0.5 MiB/s"


def test_a_job_on_a_terminal_draws_bars_and_keeps_the_task_log(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TERM", "xterm")
    node.add_vm(100, {"scsi0": 2 * MiB})
    term = Tty()
    result = run_backup_job(node.root, "rec", [100], terminal=term)  # type: ignore[arg-type]
    assert not result.failed
    text = term.getvalue()
    assert "\x1b[" in text  # rich drew on it
    assert "INFO: Starting Backup of VM 100 (qemu)" in text
    assert "backup job finished successfully" in text
    assert result.guests[0].log_path is not None
    assert "Starting Backup of VM 100" in result.guests[0].log_path.read_text()
