"""``pvebackup gc``: frees what removed backups used, reports it, dry run changes nothing."""

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


def _files(path: Path) -> dict[str, int]:
    return {str(p.relative_to(path)): p.stat().st_size for p in path.rglob("*") if p.is_file()}


def _backup(path: Path, t: int, chunks: list[bytes]) -> None:
    store = Datastore.open(LocalBackend(path))
    with store.new_snapshot(SnapshotId(GuestType.QEMU, 100, t), chunk_size=CS) as w:
        with w.index_writer("drive-scsi0", len(chunks) * CS) as iw:
            for i, c in enumerate(chunks):
                iw.set(i, store.insert_chunk(c).digest)
    store.close()


def test_gc_frees_a_removed_backup_in_two_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "st"
    Datastore.create(LocalBackend(path), chunk_size=CS)
    data = [os.urandom(CS) for _ in range(8)]
    _backup(path, T0, data[:6])
    _backup(path, T0 + 60, data[4:])
    root = tmp_path / "node"
    (root / "etc" / "pve").mkdir(parents=True)
    (root / "etc" / "pve" / "storage.cfg").write_text(
        f"backup-store: st\n\tpath {path}\n\ndir: local\n\tpath {tmp_path / 'vz'}\n"
    )
    assert main(["--root", str(root), "remove", "st:backup/vm-100-2026-11-26T09:30:00Z"]) == 0
    capsys.readouterr()
    before = _files(path)
    assert main(["--root", str(root), "gc", "st", "--dry-run"]) == 0
    assert "condemned 4 chunks" in capsys.readouterr().out
    assert _files(path) == before
    assert main(["--root", str(root), "gc", "st"]) == 0  # condemns
    assert "removed 0 chunks" in capsys.readouterr().out
    assert main(["--root", str(root), "gc", "st"]) == 0  # deletes (no backup runs)
    out = capsys.readouterr().out
    assert "removed 4 chunks" in out
    assert sum(_files(path).values()) < sum(before.values()) - 3 * CS
    store = Datastore.open(LocalBackend(path))
    idx = store.open_snapshot(SnapshotId(GuestType.QEMU, 100, T0 + 60)).open_index("drive-scsi0")
    assert [store.read_chunk(idx.digest(i)) for i in range(4)] == data[4:]


def test_gc_refuses_a_storage_of_another_type(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "node"
    (root / "etc" / "pve").mkdir(parents=True)
    (root / "etc" / "pve" / "storage.cfg").write_text(f"dir: local\n\tpath {tmp_path / 'vz'}\n")
    assert main(["--root", str(root), "gc", "local"]) == 4  # UnsupportedError
    assert "gc is for backup-store" in capsys.readouterr().err


def test_gc_json_matches_the_doc(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from test_cli_json_schemas import documented, keys_of, run_json

    path = tmp_path / "st"
    Datastore.create(LocalBackend(path), chunk_size=CS)
    _backup(path, T0, [os.urandom(CS) for _ in range(2)])
    root = tmp_path / "node"
    (root / "etc" / "pve").mkdir(parents=True)
    (root / "etc" / "pve" / "storage.cfg").write_text(f"backup-store: st\n\tpath {path}\n")
    code, report = run_json(None, capsys, "--root", str(root), "gc", "st", "--dry-run")
    assert code == 0 and keys_of(report) == documented()["gc"]
    assert report["dry_run"] is True and report["snapshots"] == 1
