"""Provider configuration, call order errors, configs and task log handling."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from bdir_helpers import STOREID, LogRecords

from pvebackup.api.errors import (
    StorageConfigError,
    StorageUnavailableError,
    UnsupportedError,
    UsageError,
    VolumeNotFoundError,
)
from pvebackup.api.types import GuestType
from pvebackup.providers.directory.provider import BackupDirProvider

Make = Callable[..., BackupDirProvider]


@pytest.mark.parametrize(
    ("props", "message"),
    [
        ({"bitmap": "maybe"}, "bitmap"),
        ({"ct-format": "zip"}, "ct-format"),
        ({"path": ""}, "'path'.*not an absolute path"),
    ],
)
def test_bad_storage_properties(make_provider: Make, props: dict[str, str], message: str) -> None:
    with pytest.raises(StorageConfigError, match=message):
        make_provider(**props)


def test_job_start_needs_an_existing_path(make_provider: Make, tmp_path: Path) -> None:
    provider = make_provider(path=str(tmp_path / "nope"))
    with pytest.raises(StorageUnavailableError, match="does not exist"):
        provider.job_start(0)
    assert not (tmp_path / "nope").exists()


def test_calls_before_backup_start_are_refused(provider: BackupDirProvider) -> None:
    with pytest.raises(UsageError, match="backup_start was not called"):
        provider.backup_get_target(100, GuestType.QEMU)


def test_configs_and_log_are_stored_beside_the_data(
    provider: BackupDirProvider, tmp_path: Path, logs: LogRecords
) -> None:
    conf, fw, log = tmp_path / "c", tmp_path / "f", tmp_path / "l"
    conf.write_text("memory: 512\n")
    fw.write_text("[OPTIONS]\nenable: 1\n")
    log.write_text("INFO: done\n")
    provider.job_start(0)
    provider.backup_start(300, GuestType.QEMU)
    volname = provider.backup_get_target(300, GuestType.QEMU)
    provider.backup_guest_config(300, str(conf))
    provider.backup_firewall_config(300, str(fw))
    provider.backup_end(300)
    provider.backup_handle_log_file(300, str(log))
    provider.job_end()
    volume = provider.layout.volume_path(volname)
    assert (volume / "task.log").read_text() == "INFO: done\n"
    assert provider.extract_guest_config(volname, STOREID) == "memory: 512\n"
    assert provider.extract_firewall_config(volname, STOREID) == "[OPTIONS]\nenable: 1\n"
    assert provider.restore_qemu_get_device_info(volname, STOREID) == {}
    assert provider.backup_get_task_size(300) > 0
    with pytest.raises(UnsupportedError):
        provider.restore_tar_init(volname, STOREID)
    assert all(level == "info" for level, _ in logs)


def test_aborted_guest_log_is_not_kept(
    provider: BackupDirProvider, tmp_path: Path, logs: LogRecords
) -> None:
    log = tmp_path / "l"
    log.write_text("ERROR: failed\n")
    provider.job_start(0)
    provider.backup_start(300, GuestType.LXC)
    provider.backup_abort(300, "boom")
    provider.backup_abort(300, "boom")  # idempotent
    provider.backup_handle_log_file(300, str(log))
    assert provider.backup_get_task_size(300) == 0
    assert ("info", "backup-dir: backup of 300 did not complete, log not kept") in logs


def test_restore_of_missing_volume(provider: BackupDirProvider) -> None:
    with pytest.raises(VolumeNotFoundError):
        provider.restore_get_mechanism("backup/vm-1-2026-11-26T09:30:00Z", STOREID)


def test_unsafe_device_names_are_refused(provider: BackupDirProvider) -> None:
    provider.job_start(0)
    provider.backup_start(100, GuestType.QEMU)
    for bad in ("../x", ".hidden", "guest.conf"):
        with pytest.raises(UsageError):
            provider.backup_nbd(100, bad, "/x", "none", None, None)
