"""A hostile backup-dir storage must not make a VM restore read host files.

Every test builds a volume by hand, the way someone who can write the storage
would: names in ``index.json``, symlinks, FIFOs and qcow2 headers that point at a
"host secret" (a file under tmp_path standing in for /etc/shadow). Each must be
refused with a typed error before qemu reads anything, and the secret's bytes
must never reach a restored disk. The legitimate chain, built the same way, still
restores identically, also when the stored files are swapped after the check.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
from bdir_helpers import STOREID, qemu_io, run

from pvebackup.api.errors import (
    CorruptIndexError,
    IntegrityError,
    PveBackupError,
    UnsafeArchiveError,
    UnsafeImageError,
)
from pvebackup.api.types import GuestType
from pvebackup.cli.main import main
from pvebackup.host import restoresource as restore
from pvebackup.host.guests import NodeRoot
from pvebackup.host.restore import run_restore
from pvebackup.providers.directory import images
from pvebackup.providers.directory.provider import BackupDirProvider
from pvebackup.providers.directory.volumes import BackupIndex, DeviceEntry, VolumeName

pytestmark = pytest.mark.e2e

MIB = 1024 * 1024
DEVICE = "drive-scsi0"
T0 = 1_700_000_000
SECRET = b"HOST-SECRET-" * 16


def volname_at(ctime: int, vmid: int = 100) -> str:
    return str(VolumeName(GuestType.QEMU, vmid, ctime))


def volume_dir(store: Path, volname: str) -> Path:
    return store / "backup" / VolumeName.parse(volname).dirname


def write_volume(
    store: Path,
    volname: str,
    *,
    file: str = f"{DEVICE}.qcow2",
    size: int = MIB,
    backing: str | None = None,
) -> Path:
    """A volume directory with index.json and guest.conf; returns the directory."""
    directory = volume_dir(store, volname)
    directory.mkdir(parents=True, exist_ok=True)
    name = VolumeName.parse(volname)
    index = BackupIndex(
        vmid=name.vmid,
        vmtype=GuestType.QEMU,
        ctime=name.ctime,
        devices={DEVICE: DeviceEntry(size=size, file=file, backing=backing)},
        parent=backing,
    )
    (directory / "index.json").write_text(index.to_json())
    (directory / "guest.conf").write_text("memory: 512\nscsi0: local:100/vm-100-disk-0.qcow2\n")
    return directory


def qcow2(path: Path, *options: str, size: int = MIB) -> Path:
    run("qemu-img", "create", "-q", "-f", "qcow2", *options, str(path), str(size))
    return path


def secret_file(tmp_path: Path) -> Path:
    """The host file an attacker wants: raw bytes spelling HOST-SECRET."""
    path = tmp_path / "host-secret"
    path.write_bytes(SECRET * (MIB // len(SECRET)))
    return path


def secret_qcow2(tmp_path: Path) -> Path:
    """A valid qcow2 holding the secret (following a link to it would "work")."""
    path = qcow2(tmp_path / "secret.qcow2")
    run("qemu-img", "convert", "-n", "-f", "raw", "-O", "qcow2", str(secret_file(tmp_path)),
        str(path))
    return path


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def refused(provider: BackupDirProvider, volname: str, error: type[PveBackupError]) -> str:
    """Assert restore_qemu_img_init raises ``error`` and leaves no descriptor open."""
    before = open_fds()
    with pytest.raises(error) as info:
        provider.restore_qemu_img_init(volname, STOREID, DEVICE)
    assert open_fds() <= before
    return str(info.value)


# -- names from index.json ---------------------------------------------------------


@pytest.mark.parametrize(
    "file",
    ["../../etc/passwd", "/etc/passwd", "..", ".drive-scsi0.qcow2", "a\0b", "guest.conf"],
)
def test_image_name_outside_the_volume_is_refused(
    storage_path: Path, provider: BackupDirProvider, file: str
) -> None:
    volname = volname_at(T0)
    qcow2(write_volume(storage_path, volname, file=file) / f"{DEVICE}.qcow2")
    message = refused(provider, volname, UnsafeArchiveError)
    assert volname in message


def test_symlinked_image_is_refused(
    tmp_path: Path, storage_path: Path, provider: BackupDirProvider
) -> None:
    volname = volname_at(T0)
    directory = write_volume(storage_path, volname)
    os.symlink(secret_qcow2(tmp_path), directory / f"{DEVICE}.qcow2")
    assert "symlink" in refused(provider, volname, UnsafeArchiveError)


@pytest.mark.parametrize("kind", ["fifo", "directory", "device"])
def test_image_that_is_not_a_regular_file_is_refused(
    storage_path: Path, provider: BackupDirProvider, kind: str
) -> None:
    volname = volname_at(T0)
    image = write_volume(storage_path, volname) / f"{DEVICE}.qcow2"
    if kind == "fifo":
        os.mkfifo(image)  # opening it for reading would block forever
    elif kind == "directory":
        image.mkdir()
    else:
        os.mknod(image, 0o600 | 0o020000, os.makedev(1, 3))  # /dev/null's numbers
    assert "not a regular file" in refused(provider, volname, UnsafeArchiveError)


def test_symlinked_volume_directory_is_refused(
    tmp_path: Path, storage_path: Path, provider: BackupDirProvider
) -> None:
    elsewhere = tmp_path / "elsewhere"
    real = write_volume(elsewhere, volname_at(T0))
    qcow2(real / f"{DEVICE}.qcow2")
    volname = volname_at(T0)
    (storage_path / "backup").mkdir()
    os.symlink(real, volume_dir(storage_path, volname))
    assert "symlink" in refused(provider, volname, UnsafeArchiveError)


def test_symlinked_index_is_refused(
    tmp_path: Path, storage_path: Path, provider: BackupDirProvider
) -> None:
    volname = volname_at(T0)
    directory = write_volume(storage_path, volname)
    qcow2(directory / f"{DEVICE}.qcow2")
    os.replace(directory / "index.json", tmp_path / "index.json")
    os.symlink(tmp_path / "index.json", directory / "index.json")
    assert "index.json is a symlink" in refused(provider, volname, UnsafeArchiveError)


def test_oversized_index_is_refused_without_reading_it_all(
    storage_path: Path, provider: BackupDirProvider
) -> None:
    volname = volname_at(T0)
    directory = write_volume(storage_path, volname)
    qcow2(directory / f"{DEVICE}.qcow2")
    with open(directory / "index.json", "r+b") as index:
        index.seek(0, os.SEEK_END)
        index.write(b" " * (1 << 20))  # still valid JSON, but beyond the bound
    assert "larger than" in refused(provider, volname, CorruptIndexError)


def test_guest_config_that_is_not_utf8_is_a_typed_error(
    storage_path: Path, provider: BackupDirProvider
) -> None:
    volname = volname_at(T0)
    (write_volume(storage_path, volname) / "guest.conf").write_bytes(b"name: \xff\xfe\n")
    with pytest.raises(IntegrityError, match="not UTF-8"):
        provider.extract_guest_config(volname, STOREID)


# -- qcow2 headers -----------------------------------------------------------------


def test_backing_file_with_an_absolute_host_path_is_refused(
    tmp_path: Path, storage_path: Path, provider: BackupDirProvider
) -> None:
    volname = volname_at(T0)
    directory = write_volume(storage_path, volname)
    qcow2(directory / f"{DEVICE}.qcow2", "-b", str(secret_file(tmp_path)), "-F", "raw")
    message = refused(provider, volname, UnsafeImageError)
    assert "host-secret" in message and "names no base" in message


def test_absolute_backing_instead_of_the_verified_base_is_refused(
    tmp_path: Path, storage_path: Path, provider: BackupDirProvider
) -> None:
    base, top = volname_at(T0), volname_at(T0 + 60)
    qcow2(write_volume(storage_path, base) / f"{DEVICE}.qcow2")
    directory = write_volume(storage_path, top, backing=base)
    qcow2(directory / f"{DEVICE}.qcow2", "-b", str(secret_qcow2(tmp_path)), "-F", "qcow2")
    assert "only the provider's own" in refused(provider, top, UnsafeImageError)


def test_backing_with_the_right_name_but_raw_format_is_refused(
    storage_path: Path, provider: BackupDirProvider
) -> None:
    base, top = volname_at(T0), volname_at(T0 + 60)
    qcow2(write_volume(storage_path, base) / f"{DEVICE}.qcow2")
    relative = f"../{VolumeName.parse(base).dirname}/{DEVICE}.qcow2"
    directory = write_volume(storage_path, top, backing=base)
    qcow2(directory / f"{DEVICE}.qcow2", "-u", "-b", relative, "-F", "raw")
    assert "format 'raw'" in refused(provider, top, UnsafeImageError)


def test_json_backing_file_name_is_refused(
    tmp_path: Path, storage_path: Path, provider: BackupDirProvider
) -> None:
    volname = volname_at(T0)
    directory = write_volume(storage_path, volname)
    spec = json.dumps({"driver": "file", "filename": str(secret_file(tmp_path))})
    qcow2(directory / f"{DEVICE}.qcow2", "-u", "-b", f"json:{spec}", "-F", "raw")
    assert "json:" in refused(provider, volname, UnsafeImageError)


@pytest.mark.parametrize("raw_flag", ["off", "on"])
def test_external_data_file_is_refused(
    tmp_path: Path, storage_path: Path, provider: BackupDirProvider, raw_flag: str
) -> None:
    volname = volname_at(T0)
    directory = write_volume(storage_path, volname)
    data = tmp_path / "data-file"
    qcow2(directory / f"{DEVICE}.qcow2", "-o", f"data_file={data},data_file_raw={raw_flag}")
    data.write_bytes(secret_file(tmp_path).read_bytes())
    assert "external data file" in refused(provider, volname, UnsafeImageError)


def test_raw_file_stored_as_qcow2_is_refused(
    tmp_path: Path, storage_path: Path, provider: BackupDirProvider
) -> None:
    volname = volname_at(T0)
    directory = write_volume(storage_path, volname)
    (directory / f"{DEVICE}.qcow2").write_bytes(secret_file(tmp_path).read_bytes())
    assert "not a qcow2 image" in refused(provider, volname, IntegrityError)


def test_truncated_qcow2_header_is_refused(
    storage_path: Path, provider: BackupDirProvider
) -> None:
    volname = volname_at(T0)
    image = qcow2(write_volume(storage_path, volname) / f"{DEVICE}.qcow2")
    with open(image, "r+b") as f:
        f.truncate(100)
    assert "not a usable qcow2 image" in refused(provider, volname, IntegrityError)


def test_virtual_size_other_than_the_index_is_refused(
    storage_path: Path, provider: BackupDirProvider
) -> None:
    volname = volname_at(T0)
    qcow2(write_volume(storage_path, volname, size=MIB) / f"{DEVICE}.qcow2", size=2 * MIB)
    assert "virtual size" in refused(provider, volname, IntegrityError)


# -- the chain ---------------------------------------------------------------------


def test_backing_chain_cycle_is_refused(storage_path: Path, provider: BackupDirProvider) -> None:
    older, newer = volname_at(T0), volname_at(T0 + 60)
    for volname, other in ((older, newer), (newer, older)):
        relative = f"../{VolumeName.parse(other).dirname}/{DEVICE}.qcow2"
        directory = write_volume(storage_path, volname, backing=other)
        qcow2(directory / f"{DEVICE}.qcow2", "-u", "-b", relative, "-F", "qcow2")
    assert "not an older backup" in refused(provider, newer, UnsafeImageError)
    assert "not an older backup" in refused(provider, older, UnsafeImageError)


@pytest.mark.parametrize(
    "backing",
    ["backup/../../etc", "backup/vm-101-2023-11-14T22:13:20Z", "/etc/passwd"],
)
def test_base_that_is_not_an_older_backup_of_the_vm_is_refused(
    storage_path: Path, provider: BackupDirProvider, backing: str
) -> None:
    volname = volname_at(T0 + 3600)
    qcow2(write_volume(storage_path, volname, backing=backing) / f"{DEVICE}.qcow2")
    assert "as its base" in refused(provider, volname, UnsafeImageError)


def test_index_of_another_guest_is_refused(
    storage_path: Path, provider: BackupDirProvider
) -> None:
    volname = volname_at(T0)
    directory = write_volume(storage_path, volname)
    qcow2(directory / f"{DEVICE}.qcow2")
    other = write_volume(storage_path, volname_at(T0, vmid=101))
    os.replace(other / "index.json", directory / "index.json")
    assert "not this volume" in refused(provider, volname, CorruptIndexError)


def build_chain(store: Path, length: int) -> tuple[list[str], list[Path]]:
    """A legitimate chain as the provider writes it, each level writing 64 KiB."""
    names: list[str] = []
    paths: list[Path] = []
    for level in range(length):
        volname = volname_at(T0 + 60 * level)
        base = names[-1] if names else None
        directory = write_volume(store, volname, backing=base)
        image = directory / f"{DEVICE}.qcow2"
        if base is None:
            qcow2(image)
        else:
            relative = f"../{VolumeName.parse(base).dirname}/{DEVICE}.qcow2"
            qcow2(image, "-b", relative, "-F", "qcow2")
        qemu_io(image, f"write -P {0x41 + level} {level * 64}k 64k")
        names.append(volname)
        paths.append(image)
    return names, paths


def test_chain_longer_than_the_bound_is_refused(
    storage_path: Path, provider: BackupDirProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    names, _ = build_chain(storage_path, 3)
    monkeypatch.setattr(images, "MAX_CHAIN_DEPTH", 2)
    assert "longer than 2 images" in refused(provider, names[-1], UnsafeImageError)


def test_legit_chain_restores_identically_even_when_swapped_after_the_check(
    tmp_path: Path, storage_path: Path, provider: BackupDirProvider
) -> None:
    names, paths = build_chain(storage_path, 3)
    expected = tmp_path / "expected.raw"
    run("qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(paths[-1]), str(expected))
    source = provider.restore_qemu_img_init(names[-1], STOREID, DEVICE)
    assert source.startswith("json:")
    # After the check, the storage swaps in hostile files under the checked names:
    # the base becomes the secret, the top a qcow2 whose backing is the secret.
    os.replace(secret_qcow2(tmp_path), paths[0])
    hostile_top = qcow2(tmp_path / "top.qcow2", "-b", str(secret_file(tmp_path)), "-F", "raw")
    os.replace(hostile_top, paths[-1])
    target = qcow2(tmp_path / "target.qcow2")
    restore.qemu_img_convert(source, target)
    out = tmp_path / "out.raw"
    run("qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(target), str(out))
    assert out.read_bytes() == expected.read_bytes()  # the checked inodes were read
    assert b"HOST-SECRET" not in out.read_bytes()
    # And the swap itself is noticed: the restore as a whole fails.
    with pytest.raises(UnsafeImageError, match="replaced or removed"):
        provider.restore_qemu_img_cleanup(names[-1], STOREID, DEVICE)


def test_untouched_chain_passes_the_cleanup_check(
    tmp_path: Path, storage_path: Path, provider: BackupDirProvider
) -> None:
    names, paths = build_chain(storage_path, 2)
    before = open_fds()
    source = provider.restore_qemu_img_init(names[-1], STOREID, DEVICE)
    target = qcow2(tmp_path / "target.qcow2")
    restore.qemu_img_convert(source, target)
    provider.restore_qemu_img_cleanup(names[-1], STOREID, DEVICE)
    assert open_fds() <= before
    run("qemu-img", "compare", "-q", "-f", "qcow2", "-F", "qcow2", str(paths[-1]), str(target))


def test_tampered_base_means_a_full_backup(
    tmp_path: Path, storage_path: Path, make_provider: Callable[..., BackupDirProvider]
) -> None:
    names, paths = build_chain(storage_path, 2)
    provider = make_provider()
    provider.layout.set_last_successful(GuestType.QEMU, 100, names[-1])
    assert provider._chain_problem(names[-1]) is None
    qcow2(paths[0], "-b", str(secret_file(tmp_path)), "-F", "raw")
    problem = provider._chain_problem(names[-1])
    assert problem is not None and "unusable as a base" in problem


# -- through the host and the command line -------------------------------------------


def make_node(tmp_path: Path) -> tuple[Path, Path]:
    """A node root with a dir storage ``local`` and a backup-dir storage ``plain``."""
    node = tmp_path / "node"
    store = tmp_path / "plain"
    (node / "etc/pve/qemu-server").mkdir(parents=True)
    (node / "etc/pve/firewall").mkdir(parents=True)
    store.mkdir()
    (node / "etc/pve/storage.cfg").write_text(
        f"dir: local\n\tpath {node}/vz\n\tcontent images,rootdir\n\n"
        f"backup-dir: plain\n\tpath {store}\n"
    )
    return node, store


def assert_nothing_restored(node: Path) -> None:
    assert not (node / "etc/pve/qemu-server/200.conf").exists()
    assert [p for p in (node / "vz").rglob("*") if p.is_file()] == []  # target freed
    for path in node.rglob("*"):
        if path.is_file():
            assert b"HOST-SECRET" not in path.read_bytes()


def test_cli_restore_of_a_hostile_image_exits_8_and_leaves_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    node, store = make_node(tmp_path)
    volname = volname_at(T0)
    directory = write_volume(store, volname)
    qcow2(directory / f"{DEVICE}.qcow2", "-b", str(secret_file(tmp_path)), "-F", "raw")

    code = main(["--root", str(node), "restore", f"plain:{volname}", "200"])
    assert code == UnsafeImageError.exit_code == 8
    err = capsys.readouterr().err
    assert "host-secret" in err and volname in err
    assert_nothing_restored(node)


@pytest.mark.parametrize("kind", ["symlink", "fifo"])
def test_cli_restore_of_a_linked_guest_config_exits_8(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str
) -> None:
    node, store = make_node(tmp_path)
    volname = volname_at(T0)
    directory = write_volume(store, volname)
    qcow2(directory / f"{DEVICE}.qcow2")
    (directory / "guest.conf").unlink()
    if kind == "symlink":
        os.symlink(secret_file(tmp_path), directory / "guest.conf")
    else:
        os.mkfifo(directory / "guest.conf")  # reading it would hang the restore
    code = main(["--root", str(node), "restore", f"plain:{volname}", "200"])
    assert code == 8
    assert "guest configuration guest.conf is a" in capsys.readouterr().err
    assert_nothing_restored(node)


def test_header_rewritten_in_place_during_the_restore_fails_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The race the check cannot close: the header is rewritten in place (same
    inode) after the check, adding a data file that qemu then reads. The inode's
    ctime gives it away, and the host throws the restored disk away."""
    node, store = make_node(tmp_path)
    volname = volname_at(T0)
    image = qcow2(write_volume(store, volname) / f"{DEVICE}.qcow2")
    data = tmp_path / "data-file"
    hostile = qcow2(tmp_path / "hostile.qcow2", "-o", f"data_file={data}")
    data.write_bytes(secret_file(tmp_path).read_bytes())
    checked = BackupDirProvider.restore_qemu_img_init

    def init_then_rewrite(self: BackupDirProvider, vol: str, sid: str, dev: str) -> str:
        source = checked(self, vol, sid, dev)
        with open(image, "r+b") as stored_image:  # same inode, new bytes
            stored_image.write(hostile.read_bytes())
            stored_image.truncate()
        return source

    monkeypatch.setattr(BackupDirProvider, "restore_qemu_img_init", init_then_rewrite)
    with pytest.raises(UnsafeImageError, match="while it was being restored"):
        run_restore(NodeRoot(node), f"plain:{volname}", 200, terminal=None)
    assert_nothing_restored(node)
