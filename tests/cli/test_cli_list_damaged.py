"""``pvebackup list`` on storages holding damaged volumes beside good ones.

Decision (issue 8, class 7): a damaged volume is not listed; a warning naming it
goes to stderr; every good volume is listed; the exit status is 0, because the
listing itself worked (and a script reading ``--output json`` still gets every
good volume). A storage that cannot be listed at all keeps its error code.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from pvebackup.api.types import GuestType
from pvebackup.cli.main import main
from pvebackup.providers.directory.volumes import INDEX_NAME, BackupIndex, VolumeName
from pvebackup.store.backends.local import LocalBackend
from pvebackup.store.datastore import Datastore
from pvebackup.store.snapshot import MANIFEST_NAME, SnapshotId

T0 = 1795685400  # 2026-11-26 09:30:00 UTC


def _node(tmp_path: Path, storage: str) -> Path:
    root = tmp_path / "node"
    (root / "etc" / "pve").mkdir(parents=True)
    (root / "etc" / "pve" / "storage.cfg").write_text(storage)
    return root


def _volume(backup_dir: Path, vmtype: GuestType, vmid: int, ctime: int) -> str:
    name = VolumeName(vmtype, vmid, ctime)
    vol = backup_dir / name.dirname
    vol.mkdir(parents=True)
    fmt = None if vmtype is GuestType.QEMU else "tar"
    index = BackupIndex(vmid=vmid, vmtype=vmtype, ctime=ctime, ct_format=fmt, stored_size=1)
    (vol / INDEX_NAME).write_text(index.to_json())
    return str(name)


def test_backup_dir_list_shows_good_volumes_and_names_damaged_ones(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = tmp_path / "bk"
    root = _node(tmp_path, f"backup-dir: bk\n\tpath {store}\n")
    backup = store / "backup"
    good = [_volume(backup, GuestType.QEMU, 100, T0), _volume(backup, GuestType.LXC, 101, T0)]
    impossible = backup / "vm-102-2026-02-31T00:00:00Z"  # 31 February
    impossible.mkdir()
    (impossible / INDEX_NAME).write_text("{}")
    not_json = _volume(backup, GuestType.QEMU, 103, T0)
    (backup / VolumeName.parse(not_json).dirname / INDEX_NAME).write_bytes(b"\xff\x00 not json")
    wrong_types = _volume(backup, GuestType.QEMU, 104, T0)
    doc = json.loads((backup / VolumeName.parse(wrong_types).dirname / INDEX_NAME).read_text())
    doc.update(vmid="104", devices=[], ctime=float("nan"))
    (backup / VolumeName.parse(wrong_types).dirname / INDEX_NAME).write_text(json.dumps(doc))
    damaged = ["backup/vm-102-2026-02-31T00:00:00Z", not_json, wrong_types]

    assert main(["--root", str(root), "list", "bk"]) == 0
    out, err = capsys.readouterr()
    for volname in good:
        assert f"bk:{volname}" in out
    for volname in damaged:
        assert f"bk:{volname}" not in out
        assert f"warning: bk:{volname}: damaged" in err
    assert "Traceback" not in err

    assert main(["--root", str(root), "list", "bk", "--output", "json"]) == 0
    out, err = capsys.readouterr()
    assert sorted(r["volid"] for r in json.loads(out)) == sorted(f"bk:{v}" for v in good)
    assert err.count("warning:") == 3


def test_backup_store_list_shows_good_snapshots_and_names_damaged_ones(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "st"
    path.mkdir()
    store = Datastore.create(LocalBackend(path), chunk_size=64 * 1024)
    good = [SnapshotId(GuestType.QEMU, 100, T0), SnapshotId(GuestType.QEMU, 101, T0)]
    for sid in [*good, SnapshotId(GuestType.QEMU, 103, T0), SnapshotId(GuestType.QEMU, 104, T0)]:
        with store.new_snapshot(sid) as w:
            w.add_file("guest.conf", b"memory: 512\n")
    snaps = path / "snapshots" / "vm"
    # An impossible date, a manifest that is no JSON, one of wrong types (re-summed,
    # as anyone who can write a plain store can do).
    (snaps / "102" / "2026-02-31T00:00:00Z").mkdir(parents=True)
    (snaps / "102" / "2026-02-31T00:00:00Z" / MANIFEST_NAME).write_text("{}")
    (snaps / "103" / "2026-11-26T09:30:00Z" / MANIFEST_NAME).write_bytes(b"\xff not json")
    manifest = snaps / "104" / "2026-11-26T09:30:00Z" / MANIFEST_NAME
    doc = json.loads(manifest.read_bytes())
    del doc["checksum"]
    doc["files"]["guest.conf"]["size"] = "12"
    canon = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    doc["checksum"] = "sha256:" + hashlib.sha256(canon).hexdigest()
    manifest.write_bytes(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode() + b"\n")
    root = _node(tmp_path, f"backup-store: st\n\tpath {path}\n")

    assert main(["--root", str(root), "list", "st"]) == 0
    out, err = capsys.readouterr()
    for sid in good:
        assert f"st:{sid.volname}" in out
    assert "vm-103" not in out and "vm-104" not in out and "102" not in out
    assert "warning: st:snapshots/vm/102/2026-02-31T00:00:00Z: damaged" in err
    assert "warning: st:backup/vm-103-2026-11-26T09:30:00Z: damaged" in err
    assert "warning: st:backup/vm-104-2026-11-26T09:30:00Z: damaged" in err


def test_list_of_a_storage_path_over_name_max_is_a_config_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = _node(tmp_path, f"backup-dir: bk\n\tpath {tmp_path}/{'x' * 300}\n")
    assert main(["--root", str(root), "list", "bk"]) == 2
    err = capsys.readouterr().err
    assert "NAME_MAX" in err and "storage.cfg:2" in err
    root2 = _node(tmp_path / "b", "backup-dir: bk\n\tpath /" + "/".join(["y" * 200] * 30) + "\n")
    assert main(["--root", str(root2), "list", "bk"]) == 2
    assert "too long" in capsys.readouterr().err
