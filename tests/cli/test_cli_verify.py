"""``pvebackup verify``: exit 0 on a clean store, 5 naming the snapshot and chunk on damage."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pvebackup.api.types import GuestType
from pvebackup.cli.main import main
from pvebackup.store.backends.local import LocalBackend
from pvebackup.store.datastore import Datastore
from pvebackup.store.snapshot import SnapshotId

CS = 64 * 1024
T0 = 1795685400
VOL0 = "backup/vm-100-2026-11-26T09:30:00Z"
VOL1 = "backup/vm-100-2026-11-26T09:31:00Z"


def _node(tmp_path: Path) -> tuple[Path, Path, list[bytes]]:
    path = tmp_path / "st"
    Datastore.create(LocalBackend(path), chunk_size=CS)
    digests = []
    for t in (T0, T0 + 60):
        store = Datastore.open(LocalBackend(path))
        with store.new_snapshot(SnapshotId(GuestType.QEMU, 100, t), chunk_size=CS) as w:
            with w.index_writer("drive-scsi0", 2 * CS) as iw:
                for i in range(2):
                    digests.append(store.insert_chunk(os.urandom(CS)).digest)
                    iw.set(i, digests[-1])
        store.close()
    root = tmp_path / "node"
    (root / "etc" / "pve").mkdir(parents=True)
    (root / "etc" / "pve" / "storage.cfg").write_text(
        f"backup-store: st\n\tpath {path}\n\ndir: local\n\tpath {tmp_path / 'vz'}\n"
    )
    return root, path, digests


def _flip(path: Path, digest: bytes) -> None:
    """Hostile input: one byte of the chunk's blob flipped in its pack."""
    loc = Datastore.open(LocalBackend(path)).locate_chunk(digest)
    assert loc is not None
    h = loc.pack.hex()
    pack = path / "packs" / h[:2] / h
    raw = bytearray(pack.read_bytes())
    raw[loc.offset + 40] ^= 0x80
    pack.write_bytes(bytes(raw))


def test_verify_clean_store_exits_0(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root, _path, _d = _node(tmp_path)
    assert main(["--root", str(root), "verify", "st"]) == 0
    out = capsys.readouterr().out
    assert f"ok     {VOL0}" in out and f"ok     {VOL1}" in out
    assert "4 chunks" in out


def test_verify_damage_exits_5_naming_snapshot_and_chunk(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root, path, digests = _node(tmp_path)
    _flip(path, digests[3])  # a chunk of the second backup only
    assert main(["--root", str(root), "verify", "st"]) == 5
    out = capsys.readouterr().out
    assert f"ok     {VOL0}" in out and f"failed {VOL1}" in out
    assert digests[3].hex() in out and "FAILED" in out
    # The first backup alone is intact.
    assert main(["--root", str(root), "verify", f"st:{VOL0}"]) == 0
    assert main(["--root", str(root), "verify", f"st:{VOL1}"]) == 5


def test_verify_refuses_other_storage_types_and_bad_names(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root, _path, _d = _node(tmp_path)
    assert main(["--root", str(root), "verify", "local"]) == 4
    assert "verify is for backup-store" in capsys.readouterr().err
    assert main(["--root", str(root), "verify", "st:../../etc"]) == 2
    assert main(["--root", str(root), "verify", "st:backup/vm-100-2020-01-01T00:00:00Z"]) == 3


def test_verify_json_matches_the_doc(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from test_cli_json_schemas import documented, keys_of, run_json

    root, path, digests = _node(tmp_path)
    _flip(path, digests[0])
    code, report = run_json(None, capsys, "--root", str(root), "verify", "st")
    skipped_keys = {"skipped[].volid", "skipped[].verified"}  # nothing skipped here
    assert code == 5 and keys_of(report) | skipped_keys == documented()["verify"]
    assert report["ok"] is False and report["skipped"] == []
    assert report["bad_chunks"][0]["digest"] == digests[0].hex()
    (record,) = report["bad_chunks"][0]["moved_aside"]
    assert record.startswith("bad/records/") and (path / record).is_file()
    assert [s["state"] for s in report["snapshots"]] == ["failed", "ok"]
    assert report["snapshots"][0]["volid"] == f"st:{VOL0}"
    # VOL1 was recorded ok just now: skipped; the failed VOL0 is checked again.
    code, again = run_json(
        None, capsys, "--root", str(root), "verify", "st", "--outdated-after", "1"
    )
    assert code == 5 and keys_of(again) == documented()["verify"]
    assert again["skipped"] == [{"volid": f"st:{VOL1}", "verified": report["started"]}]
    assert [s["volid"] for s in again["snapshots"]] == [f"st:{VOL0}"]
