"""kit.proc: children die with their parent, are stopped by PID and always reaped."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import pvebackup
from pvebackup.api.errors import ExternalToolError
from pvebackup.kit import proc

SRC = str(Path(pvebackup.__file__).resolve().parents[1])


def gone(pid: int, start: int, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.process_start_time(pid) != start:
            return True
        time.sleep(0.02)
    return False


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, object]] = []

    def child_started(self, info: proc.ChildInfo) -> None:
        self.events.append(("started", info))

    def child_ended(self, info: proc.ChildInfo) -> None:
        self.events.append(("ended", info))

    def dir_planned(self, path: str) -> None:
        # Told before the directory exists, so a killed run has always recorded it.
        self.events.append(("dir", (path, os.path.exists(path))))


def test_child_dies_when_its_parent_is_killed(tmp_path: Path) -> None:
    # A parent that spawns `sleep` and is then killed with SIGKILL: no finally runs.
    script = (
        "import sys, time\n"
        "from pvebackup.kit import proc\n"
        "c = proc.spawn(['sleep', '60'])\n"
        "print(c.pid, c.info.start_time, flush=True)\n"
        "time.sleep(60)\n"
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", script],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": SRC},
    )
    try:
        assert parent.stdout is not None
        pid, start = (int(x) for x in parent.stdout.readline().split())
        assert proc.process_alive(pid, start, "sleep")
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        assert gone(pid, start), "the child outlived its killed parent"
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        if parent.stdout is not None:
            parent.stdout.close()


def test_child_of_a_parent_that_died_before_prctl_exits() -> None:
    # The pre-exec check: the parent it expects is not its parent, so it must not run.
    child = subprocess.Popen(["sleep", "30"], preexec_fn=proc._die_with(os.getpid() + 999999))
    try:
        assert child.wait(5) == 126
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


def test_stop_escalates_to_sigkill_reaps_and_removes_the_run_dir(tmp_path: Path) -> None:
    run_dir = proc.private_dir("t-", tmp_path)
    assert run_dir.stat().st_mode & 0o777 == 0o700
    child = proc.spawn(
        ["sh", "-c", "trap '' TERM; echo ready; sleep 30"],
        run_dir=run_dir,
        stdout=subprocess.PIPE,
    )
    assert child.stdout is not None and child.stdout.readline() == b"ready\n"
    started = time.monotonic()
    assert child.stop(0.3) == -signal.SIGKILL  # TERM was ignored
    assert time.monotonic() - started < 5
    assert child.poll() == -signal.SIGKILL  # reaped: no zombie left
    assert not run_dir.exists()
    assert child.stop() == -signal.SIGKILL  # idempotent


def test_run_kills_its_child_on_timeout() -> None:
    rec = Recorder()
    with proc.observe_children(rec), pytest.raises(ExternalToolError, match="did not finish"):
        proc.run(["sleep", "30"], timeout=0.2)
    kinds = [k for k, _ in rec.events]
    assert kinds == ["started", "ended"]
    info = rec.events[0][1]
    assert isinstance(info, proc.ChildInfo)
    assert gone(info.pid, info.start_time, 0.5)


def test_run_captures_and_reports_a_missing_program(tmp_path: Path) -> None:
    res = proc.run(["sh", "-c", "echo out; echo err >&2; exit 3"])
    assert (res.returncode, res.out, res.err) == (3, "out\n", "err")
    with pytest.raises(ExternalToolError, match="cannot run"):
        proc.run([str(tmp_path / "missing")])


def test_observers_hear_of_dirs_before_they_exist(tmp_path: Path) -> None:
    rec = Recorder()
    with proc.observe_children(rec):
        made = proc.private_dir("obs-", tmp_path)
    assert rec.events == [("dir", (str(made), False))]
    proc.private_dir("after-", tmp_path)
    assert len(rec.events) == 1  # no longer observed


def test_kill_verified_leaves_a_recycled_pid_alone() -> None:
    child = proc.spawn(["sleep", "30"])
    try:
        start = child.info.start_time
        # Another start time or another program: not the process that was recorded.
        assert not proc.kill_verified(child.pid, start + 1, "sleep")
        assert not proc.kill_verified(child.pid, start, "qemu-storage-daemon")
        assert child.poll() is None
        assert proc.kill_verified(child.pid, start, "/usr/bin/sleep")
        assert child.wait(5) == -signal.SIGKILL
    finally:
        child.stop(0)


def test_zombie_counts_as_gone() -> None:
    child = subprocess.Popen(["true"])
    deadline = time.monotonic() + 5
    while proc.process_start_time(child.pid) is not None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert proc.process_start_time(child.pid) is None  # exited, not yet reaped
    child.wait()


def test_children_spawned_in_a_thread_live_while_the_thread_lives() -> None:
    # PDEATHSIG follows the spawning thread: a child of a thread that stays alive
    # keeps running; documented in kit.proc, checked here so the note stays true.
    result: list[proc.Child] = []
    release = threading.Event()

    def worker() -> None:
        result.append(proc.spawn(["sleep", "30"]))
        release.wait(10)

    t = threading.Thread(target=worker)
    t.start()
    try:
        deadline = time.monotonic() + 5
        while not result and time.monotonic() < deadline:
            time.sleep(0.01)
        child = result[0]
        time.sleep(0.1)
        assert child.poll() is None
        release.set()
        t.join()
        assert child.wait(5) == -signal.SIGKILL  # its thread ended: the kernel killed it
    finally:
        release.set()
        t.join()
        for c in result:
            c.stop(0)


def test_kill_verified_waits_for_an_exiting_process(monkeypatch: pytest.MonkeyPatch) -> None:
    # Killed with its parent a moment ago: no command line any more, but its files
    # (an image's write lock) are only closed when its start time disappears.
    seen = iter([100, 100, 100, None])
    monkeypatch.setattr(proc, "process_start_time", lambda pid: next(seen))
    monkeypatch.setattr(proc, "_program", lambda pid: "")
    signals: list[int] = []
    monkeypatch.setattr(proc.os, "kill", lambda pid, sig: signals.append(sig))
    assert proc.kill_verified(4242, 100, "qemu-storage-daemon") is False
    assert signals == []  # nothing to kill: it is on its way out
    assert next(seen, "waited") == "waited"  # but it was waited for
