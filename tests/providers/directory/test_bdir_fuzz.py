"""Fuzzing what a backup-dir storage holds: volume names, index.json, the volume
directories a listing walks, and the stored guest configs.

Property (issue 8): success or a typed ``PveBackupError``, never another
exception; a listing shows every good volume whatever else lies beside it and
reports each damaged one; reading changes nothing on the storage.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
from bdir_helpers import STOREID
from hypothesis import given
from hypothesis import strategies as st

from fuzzing import FUZZ, hostile_json_bytes, peak_memory, typed_or_ok
from pvebackup.api.errors import (
    CorruptIndexError,
    IntegrityError,
    PermanentBackendError,
    UnsafeArchiveError,
    VolumeNotFoundError,
)
from pvebackup.api.types import GuestType
from pvebackup.kit import safefs
from pvebackup.providers.directory.plugin import BackupDirPlugin
from pvebackup.providers.directory.provider import BackupDirProvider
from pvebackup.providers.directory.volumes import (
    INDEX_NAME,
    BackupIndex,
    DeviceEntry,
    VolumeLayout,
    VolumeName,
)

T0 = 1795685400  # 2026-11-26 09:30:00 UTC

_INDEX = BackupIndex(
    vmid=100,
    vmtype=GuestType.QEMU,
    ctime=T0,
    devices={"drive-scsi0": DeviceEntry(1 << 20, "drive-scsi0.qcow2", None, "new")},
    bitmap_id="abc",
    stored_size=8192,
)
_INDEX_DOC = json.loads(_INDEX.to_json())


def _commit(root: Path, vmtype: GuestType, vmid: int, ctime: int) -> str:
    volname = str(VolumeName(vmtype, vmid, ctime))
    layout = VolumeLayout(root)
    work = layout.temp_path(volname)
    work.mkdir(parents=True)
    (work / "guest.conf").write_text("memory: 512\n")
    index = BackupIndex(vmid=vmid, vmtype=vmtype, ctime=ctime, stored_size=4096,
                        ct_format=None if vmtype is GuestType.QEMU else "tar")  # fmt: skip
    fd = os.open(work, os.O_RDONLY | os.O_DIRECTORY)
    try:
        layout.write_index(fd, index)
    finally:
        os.close(fd)
    layout.commit(volname)
    return volname


def _tree(root: Path) -> dict[str, tuple[int, int, int]]:
    """Every entry below ``root`` with its mode, size and mtime (to prove no writes)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            st_ = os.lstat(os.path.join(dirpath, name))
            out[os.path.join(dirpath, name)] = (st_.st_mode, st_.st_size, st_.st_mtime_ns)
    return out


# --- names ---------------------------------------------------------------------------

_STAMPS = st.from_regex(r"[0-9]{4}_[0-9]{2}_[0-9]{2}-[0-9]{2}_[0-9]{2}_[0-9]{2}", fullmatch=True)


@FUZZ
@given(
    st.sampled_from(["qemu", "lxc", "vm"]),
    st.integers(-1, 10**10).map(str) | st.text(max_size=10),
    _STAMPS | st.text(max_size=20),
)
def test_volume_names_parse_or_typed_error(vmtype: str, vmid: str, stamp: str) -> None:
    volname = f"backup/{vmtype}-{vmid}-{stamp}"
    result = typed_or_ok(lambda: VolumeName.parse(volname))
    assert isinstance(result, VolumeName | VolumeNotFoundError)
    if isinstance(result, VolumeName):
        assert str(result) == volname


@pytest.mark.parametrize(
    ("stamp", "why"),
    [("2026-02-31T00:00:00Z", "impossible time"), ("2026-11-26T24:00:00Z", "impossible time"),
     ("0001-01-01T00:00:00Z", "out of range"), ("1969-12-31T23:59:59Z", "out of range")],
)  # fmt: skip
def test_impossible_or_uncanonical_time_is_a_typed_error(stamp: str, why: str) -> None:
    with pytest.raises(VolumeNotFoundError, match=why):
        VolumeName.parse(f"backup/vm-100-{stamp}")


# --- index.json ----------------------------------------------------------------------


@FUZZ
@given(hostile_json_bytes(_INDEX_DOC))
def test_index_json_is_typed(raw: bytes) -> None:
    result = typed_or_ok(lambda: BackupIndex.from_json(raw, "fuzz"))
    assert isinstance(result, BackupIndex | CorruptIndexError)
    if isinstance(result, BackupIndex):  # whatever was accepted has the right types
        assert type(result.vmid) is int and 1 <= result.vmid
        assert all(type(d.size) is int and d.size >= 0 for d in result.devices.values())
        assert all(type(d.file) is str for d in result.devices.values())
        assert result.parent is None or type(result.parent) is str


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("devices",), []),
        (("devices", "drive-scsi0"), "x"),
        (("devices", "drive-scsi0", "size"), "1048576"),
        (("devices", "drive-scsi0", "size"), -1),
        (("devices", "drive-scsi0", "size"), 2**64),
        (("devices", "drive-scsi0", "size"), float("inf")),
        (("devices", "drive-scsi0", "size"), True),
        (("devices", "drive-scsi0", "file"), {"a": 1}),
        (("devices", "drive-scsi0", "backing"), 5),
        (("devices", "drive-scsi0", "bitmap-mode"), "always"),
        (("vmid",), "100"),
        (("ctime",), float("nan")),
        (("parent",), ["backup/x"]),
        (("ct-format",), "zip"),
        (("stored-size",), -5),
    ],
)
def test_index_json_wrong_types_are_refused_not_coerced(
    path: tuple[str, ...], value: object
) -> None:
    doc = json.loads(_INDEX.to_json())
    target = doc
    for k in path[:-1]:
        target = target[k]
    target[path[-1]] = value
    with pytest.raises(CorruptIndexError):
        BackupIndex.from_json(json.dumps(doc), "t")


# --- listing a storage with hostile entries -------------------------------------------

_ENTRY_KINDS = ["garbage", "non-utf8", "directory", "fifo", "symlink-loop", "huge", "nest",
                "wrong-guest", "mutated", "no-index"]  # fmt: skip


@st.composite
def _hostile_volume(draw: st.DrawFn) -> tuple[str, str, bytes]:
    vmid = draw(st.integers(200, 299))
    stamp = draw(st.sampled_from(["2026-02-31T00:00:00Z", "2026-13-01T00:00:00Z",
                                  "2026-11-26T25:00:00Z", "2026-11-26T10:00:00Z"]))  # fmt: skip
    kind = draw(st.sampled_from(_ENTRY_KINDS))
    payload = draw(hostile_json_bytes(_INDEX_DOC)) if kind == "mutated" else b""
    return f"{draw(st.sampled_from(['vm', 'ct']))}-{vmid}-{stamp}", kind, payload


def _plant(backup_dir: Path, name: str, kind: str, payload: bytes) -> None:
    vol = backup_dir / name
    vol.mkdir(exist_ok=True)
    index = vol / INDEX_NAME
    if index.exists() or index.is_symlink():
        return
    if kind == "garbage":
        index.write_bytes(b"{not json")
    elif kind == "non-utf8":
        index.write_bytes(b'{"format": "\xff\xfe"}')
    elif kind == "directory":
        index.mkdir()
    elif kind == "fifo":
        os.mkfifo(index)
    elif kind == "symlink-loop":
        index.symlink_to(INDEX_NAME)
    elif kind == "huge":
        with open(index, "wb") as f:
            f.truncate(64 << 20)  # sparse
    elif kind == "nest":
        index.write_bytes(b"[" * 100_000 + b"]" * 100_000)
    elif kind == "wrong-guest":
        index.write_text(BackupIndex(vmid=999, vmtype=GuestType.QEMU, ctime=T0).to_json())
    elif kind == "mutated":
        index.write_bytes(payload)


@FUZZ
@given(st.lists(_hostile_volume(), max_size=4, unique_by=lambda e: e[0]))
def test_listing_shows_every_good_volume_and_reports_the_damaged(
    tmp_path: Path, hostile: list[tuple[str, str, bytes]]
) -> None:
    root = tmp_path / "store"
    if not root.exists():
        _commit(root, GuestType.QEMU, 100, T0)
        _commit(root, GuestType.LXC, 101, T0 + 60)
    backup_dir = root / "backup"
    for entry in backup_dir.iterdir():  # the previous example's hostile entries
        if entry.name[:7] not in ("vm-100-", "ct-101-"):
            _remove(entry)
    for name, kind, payload in hostile:
        _plant(backup_dir, name, kind, payload)
    before = _tree(root)
    scfg = {"type": "backup-dir", "path": str(root)}
    plugin = BackupDirPlugin()
    scan = plugin.scan_volumes(scfg, STOREID)
    peak = peak_memory(lambda: plugin.scan_volumes(scfg, STOREID))
    listed = {v.volid for v in scan.volumes}
    assert {f"{STOREID}:backup/vm-100-2026-11-26T09:30:00Z",
            f"{STOREID}:backup/ct-101-2026-11-26T09:31:00Z"} <= listed  # fmt: skip
    damaged = {d.volid for d in scan.damaged}
    assert not listed & damaged
    for name, kind, _ in hostile:
        volid = f"{STOREID}:backup/{name}"
        if kind != "no-index":  # without an index.json it is no volume of ours
            assert volid in listed | damaged  # never silently dropped
        if kind not in ("no-index", "mutated"):
            assert volid in damaged
    assert _tree(root) == before  # listing wrote nothing
    assert peak < 16 << 20


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        for child in path.iterdir():
            _remove(child)
        path.rmdir()
    else:
        path.unlink()


def test_remove_is_not_blocked_by_a_damaged_neighbour(tmp_path: Path) -> None:
    good = _commit(tmp_path, GuestType.QEMU, 100, T0)
    bad = tmp_path / "backup" / "vm-101-2026-11-26T09:40:00Z"
    bad.mkdir()
    (bad / INDEX_NAME).write_text("[]")
    BackupDirPlugin().free_volume({"type": "backup-dir", "path": str(tmp_path)}, STOREID, good)
    assert not (tmp_path / "backup" / VolumeName.parse(good).dirname).exists()


# --- stored guest configs --------------------------------------------------------------

_CONFIG_KINDS = ["non-utf8", "directory", "fifo", "huge", "dev-zero", "missing", "ok"]


@pytest.mark.parametrize("kind", _CONFIG_KINDS)
def test_extract_guest_config_gives_typed_errors(
    tmp_path: Path, provider: BackupDirProvider, storage_path: Path, kind: str
) -> None:
    volname = _commit(storage_path, GuestType.QEMU, 100, T0)
    conf = storage_path / "backup" / VolumeName.parse(volname).dirname / "guest.conf"
    conf.unlink()
    if kind == "non-utf8":
        conf.write_bytes(b"memory: \xff\xfe\n")
    elif kind == "directory":
        conf.mkdir()
    elif kind == "fifo":
        os.mkfifo(conf)
    elif kind == "huge":
        with open(conf, "wb") as f:
            f.truncate(1 << 30)
    elif kind == "dev-zero":
        conf.symlink_to("/dev/zero")
    elif kind == "ok":
        conf.write_text("memory: 512\n")
    if kind == "ok":
        assert provider.extract_guest_config(volname, STOREID) == "memory: 512\n"
        return
    peak = peak_memory(lambda: provider.extract_guest_config(volname, STOREID))
    assert peak < 4 << 20
    # damaged (IntegrityError) or hostile (a link, FIFO or directory: UnsafeStorageError)
    with pytest.raises((IntegrityError, UnsafeArchiveError)):
        provider.extract_guest_config(volname, STOREID)


@pytest.mark.parametrize("kind", ["non-utf8", "directory", "fifo"])
def test_extract_firewall_config_gives_typed_errors(
    provider: BackupDirProvider, storage_path: Path, kind: str
) -> None:
    volname = _commit(storage_path, GuestType.QEMU, 100, T0)
    fw = storage_path / "backup" / VolumeName.parse(volname).dirname / "firewall.fw"
    if kind == "non-utf8":
        fw.write_bytes(b"\xff")
    elif kind == "directory":
        fw.mkdir()
    else:
        os.mkfifo(fw)
    result = typed_or_ok(lambda: provider.extract_firewall_config(volname, STOREID))
    assert isinstance(result, IntegrityError | UnsafeArchiveError)



def test_unlistable_backup_directory_is_a_backend_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _commit(tmp_path, GuestType.QEMU, 100, T0)

    def fail(dir_fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(safefs, "listdir_at", fail)
    with pytest.raises(PermanentBackendError, match="cannot list"):
        BackupDirPlugin().scan_volumes({"type": "backup-dir", "path": str(tmp_path)}, STOREID)
