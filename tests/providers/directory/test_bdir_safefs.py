"""backup-dir with symlinks planted in (or swapped into) the storage.

``outside`` stands for host files; every hostile link is made in the test, the
way whoever can write the storage (a NAS user, a shared disk) could make it.
"""

from __future__ import annotations

import os
import resource
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from bdir_helpers import NbdExports, qemu_io, run

from pvebackup.api.errors import UnsafeStorageError
from pvebackup.api.types import BitmapMode, GuestType, IdMapEntry
from pvebackup.kit import safefs
from pvebackup.kit.fswalk import Entry, SourceWalker
from pvebackup.kit.safefs import owned_fd
from pvebackup.providers.directory import tree
from pvebackup.providers.directory.provider import BackupDirProvider
from pvebackup.providers.directory.volumes import BackupIndex, VolumeLayout, allocated_size

Make = Callable[..., BackupDirProvider]
ID_MAP = [IdMapEntry("u", 0, 100000, 65536), IdMapEntry("g", 0, 100000, 65536)]


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    d = tmp_path / "outside"
    d.mkdir()
    (d / "precious").write_text("host data\n")
    return d


def intact(outside: Path) -> bool:
    return sorted(os.listdir(outside)) == ["precious"] and (
        (outside / "precious").read_text() == "host data\n"
    )


def test_backup_refuses_a_symlinked_backup_directory(
    make_provider: Make, storage_path: Path, outside: Path
) -> None:
    (storage_path / "backup").symlink_to(outside)
    provider = make_provider()
    with pytest.raises(UnsafeStorageError, match="symlink"):
        provider.job_start(0)
    with pytest.raises(UnsafeStorageError, match="symlink"):
        provider.backup_start(100, GuestType.QEMU)
    assert intact(outside)


def test_a_symlinked_last_directory_is_neither_read_nor_written(
    storage_path: Path, outside: Path
) -> None:
    layout = VolumeLayout(storage_path)
    (storage_path / "backup").mkdir()
    (outside / "qemu-100").write_text("backup/vm-100-2026-11-26T09:30:00Z\n")
    (storage_path / "backup" / ".last").symlink_to(outside)
    with pytest.raises(UnsafeStorageError):
        layout.last_recorded(GuestType.QEMU, 100)
    with pytest.raises(UnsafeStorageError):
        layout.set_last_successful(GuestType.QEMU, 100, "backup/vm-100-2026-11-27T09:30:00Z")
    assert (outside / "qemu-100").read_text() == "backup/vm-100-2026-11-26T09:30:00Z\n"


def test_a_symlinked_last_record_is_refused(storage_path: Path, outside: Path) -> None:
    layout = VolumeLayout(storage_path)
    (storage_path / "backup" / ".last").mkdir(parents=True)
    (storage_path / "backup" / ".last" / "qemu-100").symlink_to(outside / "precious")
    with pytest.raises(UnsafeStorageError):
        layout.last_recorded(GuestType.QEMU, 100)
    # Recording replaces the link itself; the host file is left alone.
    layout.set_last_successful(GuestType.QEMU, 100, "backup/vm-100-2026-11-27T09:30:00Z")
    assert layout.last_recorded(GuestType.QEMU, 100) == "backup/vm-100-2026-11-27T09:30:00Z"
    assert intact(outside)


def test_listing_skips_a_symlinked_volume(storage_path: Path, outside: Path) -> None:
    layout = VolumeLayout(storage_path)
    (storage_path / "backup").mkdir()
    index = BackupIndex(vmid=100, vmtype=GuestType.QEMU, ctime=0)
    (outside / "index.json").write_text(index.to_json())
    (storage_path / "backup" / "vm-100-2026-11-26T09:30:00Z").symlink_to(outside)
    assert list(layout.volnames()) == []
    with pytest.raises(UnsafeStorageError):
        layout.read_index("backup/vm-100-2026-11-26T09:30:00Z")


def test_writes_go_to_the_held_directory_after_a_swap(
    provider: BackupDirProvider, storage_path: Path, outside: Path, tmp_path: Path
) -> None:
    """The ``.tmp-`` directory is swapped for a link after backup_start: nothing follows it."""
    config = tmp_path / "100.conf"
    config.write_text("memory: 512\n")
    provider.job_start(0)
    provider.backup_start(100, GuestType.QEMU)
    volname = provider.backup_get_target(100, GuestType.QEMU)
    work = provider.layout.temp_path(volname)
    moved = tmp_path / "moved-workdir"
    os.rename(work, moved)
    work.symlink_to(outside)
    provider.backup_guest_config(100, str(config))
    provider.backup_firewall_config(100, str(config))
    assert intact(outside)
    assert (moved / "guest.conf").read_text() == "memory: 512\n"
    with pytest.raises(UnsafeStorageError, match="replaced"):
        provider.backup_end(100)  # the link is never committed as a volume
    assert intact(outside)
    assert list(provider.layout.volnames()) == []
    assert provider.layout.last_recorded(GuestType.QEMU, 100) is None


def test_abort_after_a_swap_removes_nothing_outside(
    provider: BackupDirProvider, outside: Path
) -> None:
    provider.job_start(0)
    provider.backup_start(100, GuestType.QEMU)
    work = provider.layout.temp_path(provider.backup_get_target(100, GuestType.QEMU))
    os.rmdir(work)
    work.symlink_to(outside)
    provider.backup_abort(100, "failed")
    assert intact(outside)


class SwappingWalker(SourceWalker):
    """Swaps the copy's directory ``a`` for a link to ``outside`` once it is made."""

    copy: Path
    outside: Path

    def __iter__(self) -> Iterator[Entry]:
        for entry in super().__iter__():
            yield entry
            if entry.relpath == "a":  # copied by now: the storage writer moves in
                os.rename(self.copy / "a", self.copy.parent / "a.moved")
                (self.copy / "a").symlink_to(self.outside)


def test_tree_copy_refuses_a_directory_swapped_for_a_symlink(
    tmp_path: Path, outside: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = tmp_path / "ct"
    (source / "a").mkdir(parents=True)
    (source / "a" / "planted").write_text("container data\n")
    store = tmp_path / "work"
    store.mkdir()
    SwappingWalker.copy = store / "root"
    SwappingWalker.outside = outside
    monkeypatch.setattr(tree, "SourceWalker", SwappingWalker)
    with owned_fd(safefs.open_root(store)) as store_fd:
        with pytest.raises(UnsafeStorageError, match="symlink"):
            tree.copy_tree(str(source), ["."], ID_MAP, [], store_fd, "root", None, print)
    assert intact(outside)


def test_tree_copy_refuses_a_mount_point_below_a_container_symlink(
    tmp_path: Path, outside: Path
) -> None:
    """The container made ``/srv`` a link to a host path; ``/srv/data`` is a mount point.

    Following the copied link would change owner and mode of the host's
    directory and write into it.
    """
    (outside / "data").mkdir(mode=0o700)
    (outside / "data" / "new-file").write_text("from the mount point\n")
    before = os.stat(outside / "data")
    source = tmp_path / "ct"
    source.mkdir()
    (source / "srv").symlink_to(outside)
    store = tmp_path / "work"
    store.mkdir()
    with owned_fd(safefs.open_root(store)) as store_fd:
        with pytest.raises(UnsafeStorageError, match="symlink"):
            tree.copy_tree(
                str(source), [".", "./srv/data"], ID_MAP, [], store_fd, "root", None, print
            )
    after = os.stat(outside / "data")
    assert (after.st_uid, after.st_gid, after.st_mode) == (
        before.st_uid, before.st_gid, before.st_mode
    )
    assert os.listdir(outside / "data") == ["new-file"]


def _commit_vm_volume(provider: BackupDirProvider, tmp_path: Path) -> str:
    config = tmp_path / "100.conf"
    config.write_text("memory: 512\n")
    provider.job_start(0)
    provider.backup_start(100, GuestType.QEMU)
    volname = provider.backup_get_target(100, GuestType.QEMU)
    provider.backup_guest_config(100, str(config))
    provider.backup_end(100)
    provider.job_end()
    return volname


def test_a_stored_config_that_is_a_symlink_is_not_read(
    provider: BackupDirProvider, tmp_path: Path, outside: Path
) -> None:
    volname = _commit_vm_volume(provider, tmp_path)
    volume = provider.layout.volume_path(volname)
    (volume / "guest.conf").unlink()
    (volume / "guest.conf").symlink_to(outside / "precious")
    (volume / "firewall.fw").symlink_to(outside / "precious")
    with pytest.raises(UnsafeStorageError):
        provider.extract_guest_config(volname, "x")
    with pytest.raises(UnsafeStorageError):
        provider.extract_firewall_config(volname, "x")


def test_container_archive_goes_to_the_held_directory_after_a_swap(
    provider: BackupDirProvider, tmp_path: Path, outside: Path
) -> None:
    ct = tmp_path / "ct"
    (ct / "etc").mkdir(parents=True)
    (ct / "etc" / "hostname").write_text("ct200\n")
    provider.job_start(0)
    provider.backup_start(200, GuestType.LXC)
    work = provider.layout.temp_path(provider.backup_get_target(200, GuestType.LXC))
    moved = tmp_path / "moved-workdir"
    os.rename(work, moved)
    work.symlink_to(outside)
    provider.backup_directory(200, str(ct), ID_MAP, [], ["."], None)
    assert intact(outside)
    assert (moved / "root.tar.zst").stat().st_size > 0


def test_removing_a_volume_leaves_the_targets_of_its_symlinks(
    provider: BackupDirProvider, tmp_path: Path, outside: Path
) -> None:
    volname = _commit_vm_volume(provider, tmp_path)
    volume = provider.layout.volume_path(volname)
    (volume / "sub").mkdir()
    (volume / "sub" / "to-host").symlink_to(outside)
    (volume / "to-file").symlink_to(outside / "precious")
    provider.layout.remove(volname)
    assert not volume.exists()
    assert intact(outside)


@pytest.mark.e2e
def test_vm_image_goes_to_the_held_directory_after_a_swap(
    make_provider: Make, tmp_path: Path, outside: Path, nbd_exports: NbdExports
) -> None:
    """qemu-img and qemu-nbd get /proc/<pid>/fd/<held fd>/<image>, not the swapped path."""
    disk = tmp_path / "disk.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", str(disk), "4M")
    qemu_io(disk, "write -P 0x11 0 1M")
    provider = make_provider(bitmap="no")
    provider.job_start(0)
    provider.backup_start(100, GuestType.QEMU)
    work = provider.layout.temp_path(provider.backup_get_target(100, GuestType.QEMU))
    moved = tmp_path / "moved-workdir"
    os.rename(work, moved)
    work.symlink_to(outside)
    sock = nbd_exports.start(disk)
    provider.backup_nbd(100, "drive-scsi0", sock, BitmapMode.NONE, None, None)
    nbd_exports.stop_all()
    assert intact(outside)
    assert "virtual size: 4 MiB" in run("qemu-img", "info", str(moved / "drive-scsi0.qcow2"))


def test_allocated_size_of_a_wide_tree_holds_few_fds(tmp_path: Path) -> None:
    for i in range(300):
        (tmp_path / "vol" / f"d{i}").mkdir(parents=True)
        (tmp_path / "vol" / f"d{i}" / "f").write_bytes(b"x" * 4096)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with owned_fd(safefs.open_root(tmp_path / "vol")) as fd:
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))
        try:
            size = allocated_size(fd)
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert size >= 300 * 4096


@pytest.mark.parametrize(("ct_format", "name"), [("tar", "root.tar.zst"), ("directory", "root")])
def test_restore_refuses_stored_container_data_that_is_a_symlink(
    make_provider: Make, tmp_path: Path, outside: Path, ct_format: str, name: str
) -> None:
    provider = make_provider(**{"ct-format": ct_format})
    ct = tmp_path / "ct"
    (ct / "etc").mkdir(parents=True)
    provider.job_start(0)
    provider.backup_start(200, GuestType.LXC)
    volname = provider.backup_get_target(200, GuestType.LXC)
    provider.backup_directory(200, str(ct), ID_MAP, [], ["."], None)
    provider.backup_end(200)
    provider.job_end()
    stored = provider.layout.volume_path(volname) / name
    os.rename(stored, stored.parent / "moved-away")
    stored.symlink_to(outside / "precious" if ct_format == "tar" else outside)
    init = provider.restore_tar_init if ct_format == "tar" else provider.restore_directory_init
    with pytest.raises(UnsafeStorageError):
        init(volname, "x")
