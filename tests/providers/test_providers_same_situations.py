"""Both providers (backup-dir, backup-store): same situation, same behaviour.

The table is in the module docstring of :mod:`pvebackup.api.provider`; each test
here pins one row for both storage types, named after the seed method involved.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pvebackup.api.errors import (
    BaseUnusableError,
    NotFoundError,
    StorageFullError,
    UsageError,
)
from pvebackup.api.provider import BackupProvider, no_backup_started
from pvebackup.api.types import BitmapMode, GuestType
from pvebackup.providers.directory.plugin import BackupDirPlugin
from pvebackup.providers.store.plugin import BackupStorePlugin
from pvebackup.storage.plugin import StoragePlugin

TYPES = {"backup-dir": BackupDirPlugin, "backup-store": BackupStorePlugin}


@pytest.fixture(params=sorted(TYPES))
def plugin(request: pytest.FixtureRequest) -> StoragePlugin:
    return TYPES[request.param]()


@pytest.fixture
def state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Host state (the incremental base proof) below tmp_path."""
    state = tmp_path / "state"
    monkeypatch.setenv("PVEBACKUP_STATE_DIR", str(state))
    return state


def provider(plugin: StoragePlugin, path: Path) -> BackupProvider:
    scfg = {"type": plugin.type, "path": str(path)}
    made = plugin.new_backup_provider(scfg, "s1", lambda level, msg: None)
    assert made is not None
    return made


@pytest.fixture
def storage(tmp_path: Path) -> Path:
    path = tmp_path / "backups"
    path.mkdir()
    return path


@pytest.fixture
def host_file(tmp_path: Path) -> Path:
    conf = tmp_path / "qemu-server.conf"
    conf.write_text("memory: 512\n")
    return conf


def test_backup_get_target_without_backup_start_is_a_usage_error(
    plugin: StoragePlugin, storage: Path, host_file: Path, state_dir: Path
) -> None:
    p = provider(plugin, storage)
    p.job_start(int(time.time()))
    message = no_backup_started(100)
    for call in (
        lambda: p.backup_get_target(100, GuestType.QEMU),
        lambda: p.backup_get_task_size(100),
        lambda: p.backup_guest_config(100, str(host_file)),
        lambda: p.backup_end(100),
    ):
        with pytest.raises(UsageError) as caught:
            call()
        assert str(caught.value).endswith(message)
        assert caught.value.exit_code == 2


def test_backup_abort_and_backup_handle_log_file_without_backup_start_do_nothing(
    plugin: StoragePlugin, storage: Path, host_file: Path, state_dir: Path
) -> None:
    # The host calls both after a backup_start that failed.
    p = provider(plugin, storage)
    p.job_start(int(time.time()))
    p.backup_abort(100, "backup_start failed")
    p.backup_handle_log_file(100, str(host_file))
    p.job_end()


def test_backup_get_task_size_of_another_guest_is_a_usage_error(
    plugin: StoragePlugin, storage: Path, state_dir: Path
) -> None:
    p = provider(plugin, storage)
    p.job_start(int(time.time()))
    p.backup_start(100, GuestType.QEMU)
    with pytest.raises(UsageError, match="guest 101 was started"):
        p.backup_get_task_size(101)
    p.backup_abort(100, "test")


def test_backup_guest_config_unreadable_file_is_not_found(
    plugin: StoragePlugin, storage: Path, tmp_path: Path, state_dir: Path
) -> None:
    p = provider(plugin, storage)
    p.job_start(int(time.time()))
    p.backup_start(100, GuestType.QEMU)
    missing = tmp_path / "gone.conf"
    with pytest.raises(NotFoundError, match=f"cannot read {missing}: No such file"):
        p.backup_guest_config(100, str(missing))
    p.backup_abort(100, "test")


def test_backup_nbd_reuse_without_a_base_is_base_unusable(
    plugin: StoragePlugin, storage: Path, state_dir: Path
) -> None:
    p = provider(plugin, storage)
    p.job_start(int(time.time()))
    p.backup_start(100, GuestType.QEMU)
    # Refused before connecting: the socket does not even exist.
    with pytest.raises(BaseUnusableError, match="no previous backup .* next backup will be full"):
        p.backup_nbd(100, "drive-scsi0", "/nonexistent.sock", BitmapMode.REUSE, "bm", None)
    p.backup_abort(100, "base unusable")
    assert BaseUnusableError.exit_code == 7


def test_list_volumes_before_the_first_backup_is_empty(
    plugin: StoragePlugin, storage: Path
) -> None:
    scfg = {"type": plugin.type, "path": str(storage)}
    assert plugin.list_volumes(scfg, "s1") == []
    assert os.listdir(storage) == []  # listing created nothing


@pytest.fixture
def full_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs (we run as root), filled up, unmounted again by the test."""
    mnt = tmp_path / "full"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "pvebackup-full", str(mnt)],
                   check=True)  # fmt: skip
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "--lazy", str(mnt)], check=True)  # the store holds an fd


def test_backup_guest_config_on_a_full_storage_is_storage_full(
    plugin: StoragePlugin, full_tmpfs: Path, tmp_path: Path, state_dir: Path
) -> None:
    p = provider(plugin, full_tmpfs)
    p.job_start(int(time.time()))
    p.backup_start(100, GuestType.QEMU)
    (full_tmpfs / "filler").write_bytes(os.urandom(900 << 10))  # someone else's data
    big = tmp_path / "big.conf"
    big.write_bytes(os.urandom(512 << 10))  # more than is left, incompressible
    with pytest.raises(StorageFullError) as caught:
        p.backup_guest_config(100, str(big))
    assert caught.value.exit_code == 12
    p.backup_abort(100, "full")
