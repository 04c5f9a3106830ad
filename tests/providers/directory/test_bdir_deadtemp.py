"""backup-dir: `.tmp-*` directories of dead writers go, a live writer's stay."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from bdir_helpers import LogRecords

from pvebackup.api.types import GuestType
from pvebackup.kit.lock import lock_directory
from pvebackup.providers.directory.provider import BackupDirProvider


def test_job_start_removes_only_unlocked_temp_dirs(
    make_provider: Callable[..., BackupDirProvider], storage_path: Path, logs: LogRecords
) -> None:
    backup = storage_path / "backup"
    dead = backup / ".tmp-vm-100-2026-01-01T00:00:00Z"
    live = backup / ".tmp-vm-101-2026-01-01T00:00:00Z"
    for d in (dead, live):
        d.mkdir(parents=True)
        (d / "drive-scsi0.qcow2").write_bytes(b"partial")
    outside = storage_path / "outside"
    outside.mkdir()
    (outside / "keep").write_text("x")
    os.symlink(outside, backup / ".tmp-ct-102-2026-01-01T00:00:00Z")
    fd = lock_directory(live)  # a writer that is still running
    try:
        make_provider().job_start(0)
    finally:
        os.close(fd)
    assert not dead.exists()
    assert (live / "drive-scsi0.qcow2").exists()
    assert (outside / "keep").exists()  # a symlink is never followed
    assert ("warn", f"backup-dir: removed {dead.name} left by a dead backup") in logs
    assert not any(live.name in msg for _, msg in logs)


def test_a_running_backup_holds_its_temp_dir(
    make_provider: Callable[..., BackupDirProvider], storage_path: Path
) -> None:
    writer = make_provider()
    writer.job_start(0)
    writer.backup_start(100, GuestType.LXC)
    (temp,) = (storage_path / "backup").glob(".tmp-*")
    other = make_provider()
    other.job_start(0)  # a second job on the same storage must not remove it
    assert temp.is_dir()
    writer.backup_abort(100, "test")
    assert not temp.exists()
    writer.backup_start(100, GuestType.LXC)
    (temp,) = (storage_path / "backup").glob(".tmp-*")
    os.close(writer._guests[100].workdir_fd)  # what the kernel does when the writer dies
    writer._guests[100].workdir_fd = -1
    make_provider().job_start(0)
    assert not temp.exists()
