"""Store snapshot sidecars: never created for a missing snapshot, never a signed file's name."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pvebackup.api.errors import CorruptIndexError, UnsafeStorageError, VolumeNotFoundError
from pvebackup.api.types import GuestType
from pvebackup.kit.annotations import SIDECAR_NAMES, VerifyState
from pvebackup.store import annotations
from pvebackup.store.backends.local import LocalBackend
from pvebackup.store.datastore import Datastore
from pvebackup.store.snapshot import SnapshotId

CS = 64 * 1024
SID = SnapshotId(GuestType.QEMU, 100, 1795685400)


def _store(tmp_path: Path) -> Datastore:
    Datastore.create(LocalBackend(tmp_path / "st"), chunk_size=CS)
    store = Datastore.open(LocalBackend(tmp_path / "st"))
    with store.new_snapshot(SID, chunk_size=CS) as w:
        w.add_file("guest.conf", b"name: x\n")
    return store


def test_annotating_a_missing_snapshot_creates_nothing(tmp_path: Path) -> None:
    store = _store(tmp_path)
    ghost = SnapshotId(GuestType.QEMU, 100, 1795685460)
    with pytest.raises(VolumeNotFoundError):
        annotations.write_notes(store, ghost, "x")
    with pytest.raises(VolumeNotFoundError):
        annotations.set_protected(store, ghost, True)
    with pytest.raises(VolumeNotFoundError):
        annotations.write_verify_state(store, ghost, VerifyState("ok", 1))
    assert list(store.backend.list(ghost.prefix)) == []


@pytest.mark.parametrize("name", sorted(SIDECAR_NAMES))
def test_no_snapshot_file_may_take_a_sidecar_name(tmp_path: Path, name: str) -> None:
    store = _store(tmp_path)
    with store.new_snapshot(SnapshotId(GuestType.QEMU, 101, 1795685400)) as w:
        with pytest.raises(ValueError):
            w.add_file(name, b"signed content")
        w.abort()


def test_oversized_notes_object_is_refused_unread(tmp_path: Path) -> None:
    store = _store(tmp_path)
    path = tmp_path / "st" / SID.prefix / "notes"
    with path.open("wb") as f:  # Hostile input: a sparse 1 GiB "note"
        f.truncate(1 << 30)
    with pytest.raises(CorruptIndexError, match="more than"):
        annotations.read_notes(store, SID)


def test_symlinked_sidecars(tmp_path: Path) -> None:
    store = _store(tmp_path)
    secret = tmp_path / "secret"
    secret.write_text("host secret\n")
    prefix = tmp_path / "st" / SID.prefix
    for name in ("notes", "protected", "verify-state.json"):
        os.symlink(secret, prefix / name)
    with pytest.raises(UnsafeStorageError):
        annotations.read_notes(store, SID)
    assert annotations.is_protected(store, SID) is True  # fails safe
    assert annotations.read_verify_state(store, SID) is None
    annotations.write_notes(store, SID, "mine")
    annotations.set_protected(store, SID, False)
    assert secret.read_text() == "host secret\n"
    assert annotations.read_notes(store, SID) == "mine"
    assert not (prefix / "protected").exists() and not (prefix / "protected").is_symlink()


def test_removing_a_snapshot_removes_its_sidecars(tmp_path: Path) -> None:
    store = _store(tmp_path)
    annotations.write_notes(store, SID, "n")
    annotations.write_verify_state(store, SID, VerifyState("ok", 5))
    store.remove_snapshot(SID)
    assert list(store.backend.list(SID.prefix)) == []
