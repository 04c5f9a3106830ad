"""kit.lock: an flock refused at once with the holder's PID, gone with its holder."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import pvebackup
from pvebackup.api.errors import LockedError, PveBackupError
from pvebackup.kit.lock import FileLock, lock_directory, try_lock_directory

SRC = str(Path(pvebackup.__file__).resolve().parents[1])


def hold_in_child(path: Path) -> subprocess.Popen[str]:
    script = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from pvebackup.kit.lock import FileLock\n"
        f"FileLock(Path({str(path)!r}), what='guest 7').acquire()\n"
        "print('held', flush=True)\n"
        "time.sleep(60)\n"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", script],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": SRC},
    )
    assert child.stdout is not None and child.stdout.readline() == "held\n"
    return child


def test_second_taker_is_refused_with_the_holders_pid_until_it_dies(tmp_path: Path) -> None:
    path = tmp_path / "run/lock/7.lock"
    holder = hold_in_child(path)
    try:
        with pytest.raises(LockedError, match=rf"guest 7 is locked by PID {holder.pid}\b"):
            FileLock(path, what="guest 7").acquire()
        assert LockedError.exit_code == 7
        holder.send_signal(signal.SIGKILL)  # no cleanup: the kernel drops the flock
        holder.wait()
        with FileLock(path, what="guest 7") as lock:
            assert lock.held
            assert path.read_text().split()[0] == str(os.getpid())
        assert not lock.held
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
        assert holder.stdout is not None
        holder.stdout.close()


def test_same_process_second_lock_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "x.lock"
    with FileLock(path, what="guest 1"), pytest.raises(LockedError, match=f"PID {os.getpid()}"):
        FileLock(path, what="guest 1").acquire()


def test_symlink_at_the_lock_path_is_refused(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("keep me\n")
    (tmp_path / "lock").mkdir()
    os.symlink(victim, tmp_path / "lock/1.lock")
    with pytest.raises(PveBackupError, match="cannot open lock file"):
        FileLock(tmp_path / "lock/1.lock", what="guest 1").acquire()
    assert victim.read_text() == "keep me\n"  # not truncated through the link


def test_directory_locks(tmp_path: Path) -> None:
    d = tmp_path / "d"
    d.mkdir()
    fd = lock_directory(d)
    try:
        assert try_lock_directory(d) is None
        with pytest.raises(LockedError):
            lock_directory(d)
    finally:
        os.close(fd)
    fd2 = try_lock_directory(d)
    assert fd2 is not None
    os.close(fd2)
    os.symlink(d, tmp_path / "link")
    assert try_lock_directory(tmp_path / "link") is None  # never through a symlink
    assert try_lock_directory(tmp_path / "missing") is None
