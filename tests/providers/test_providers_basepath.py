"""Both backup storage types: a missing path is refused, is_mountpoint and
create-base-path mean what they mean in Proxmox VE, and nothing is ever created on
an unmounted storage (an unmounted backup disk must not fill up ``/``)."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pvebackup.api.errors import StorageConfigError, StorageUnavailableError
from pvebackup.providers.directory.plugin import BackupDirPlugin
from pvebackup.providers.store.plugin import BackupStorePlugin
from pvebackup.storage.plugin import StoragePlugin

TYPES = {"backup-dir": BackupDirPlugin, "backup-store": BackupStorePlugin}


@pytest.fixture(params=sorted(TYPES))
def plugin(request: pytest.FixtureRequest) -> StoragePlugin:
    return TYPES[request.param]()


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A real mount point (we run as root), unmounted again by the test."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "pvebackup-test", str(mnt)],
                   check=True)  # fmt: skip
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def start_job(plugin: StoragePlugin, scfg: dict[str, str]) -> None:
    """What a backup job does first: the one operation that may create the path."""
    provider = plugin.new_backup_provider({"type": plugin.type, **scfg}, "s1", lambda *a: None)
    assert provider is not None
    provider.job_start(int(time.time()))
    provider.job_end()


def list_volumes(plugin: StoragePlugin, scfg: dict[str, str]) -> list[str]:
    return [v.volid for v in plugin.list_volumes({"type": plugin.type, **scfg}, "s1")]


def tree(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def test_missing_path_is_refused_and_not_created(plugin: StoragePlugin, tmp_path: Path) -> None:
    path = tmp_path / "disk/backups"
    for props in ({}, {"create-base-path": "0"}, {"create-base-path": "no", "mkdir": "1"}):
        with pytest.raises(StorageUnavailableError, match="does not exist"):
            start_job(plugin, {"path": str(path), **props})
        with pytest.raises(StorageUnavailableError, match="does not exist"):
            list_volumes(plugin, {"path": str(path), **props})
    assert tree(tmp_path) == []


@pytest.mark.parametrize("props", [{"create-base-path": "yes"}, {"mkdir": "on"}])
def test_create_base_path_creates_it_on_backup_only(
    plugin: StoragePlugin, tmp_path: Path, props: dict[str, str]
) -> None:
    scfg = {"path": str(tmp_path / "disk/backups"), **props}
    with pytest.raises(StorageUnavailableError):
        list_volumes(plugin, scfg)  # reading never creates anything
    assert not (tmp_path / "disk").exists()
    start_job(plugin, scfg)
    assert (tmp_path / "disk/backups").is_dir()
    assert list_volumes(plugin, scfg) == []


@pytest.mark.parametrize("create", ["0", "1"])
def test_is_mountpoint_on_a_plain_directory_is_refused(
    plugin: StoragePlugin, tmp_path: Path, create: str
) -> None:
    present, missing = tmp_path / "present", tmp_path / "missing"
    present.mkdir()
    for scfg in (
        {"path": str(present), "is_mountpoint": "yes"},
        {"path": str(missing), "is_mountpoint": "1"},
        {"path": str(present / "sub"), "is_mountpoint": str(present)},
    ):
        scfg["create-base-path"] = create
        with pytest.raises(StorageUnavailableError, match="not mounted"):
            start_job(plugin, scfg)
        with pytest.raises(StorageUnavailableError, match="not mounted"):
            list_volumes(plugin, scfg)
    assert tree(tmp_path) == ["present"]


def test_is_mountpoint_on_a_mount_point_is_used(
    plugin: StoragePlugin, tmpfs: Path
) -> None:
    start_job(plugin, {"path": str(tmpfs), "is_mountpoint": "yes"})
    assert list_volumes(plugin, {"path": str(tmpfs), "is_mountpoint": "true"}) == []
    assert tree(tmpfs) != []  # the storage was written on the mounted file system

    below = {"path": str(tmpfs / "pve/backups"), "is_mountpoint": str(tmpfs)}
    with pytest.raises(StorageUnavailableError, match="does not exist"):
        start_job(plugin, below)
    start_job(plugin, {**below, "create-base-path": "1"})
    assert (tmpfs / "pve/backups").is_dir()


def test_is_mountpoint_false_means_no_check(plugin: StoragePlugin, tmp_path: Path) -> None:
    start_job(plugin, {"path": str(tmp_path), "is_mountpoint": "no"})
    assert list_volumes(plugin, {"path": str(tmp_path), "is_mountpoint": "off"}) == []


@pytest.mark.parametrize(
    "props",
    [{"is_mountpoint": "maybe"}, {"is_mountpoint": "relative/dir"}, {"create-base-path": "2"}],
)
def test_bad_values_are_config_errors(
    plugin: StoragePlugin, tmp_path: Path, props: dict[str, str]
) -> None:
    with pytest.raises(StorageConfigError):
        list_volumes(plugin, {"path": str(tmp_path), **props})


def test_backup_dir_create_subdirs_off(tmp_path: Path) -> None:
    plugin = BackupDirPlugin()
    with pytest.raises(StorageUnavailableError, match="create-subdirs is off"):
        start_job(plugin, {"path": str(tmp_path), "create-subdirs": "0"})
    assert tree(tmp_path) == []
    (tmp_path / "backup").mkdir()
    start_job(plugin, {"path": str(tmp_path), "create-subdirs": "0"})
