"""Which snapshot a bitmap may be applied to: the host-side proof, the store record.

Unit level: a datastore on the in-memory backend, snapshots without disks, the
host state in tmp_path. Each test makes the store lie in one way and checks that
no bitmap id (a full backup) comes back, with a warning naming why.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from bstore_support import DEVICE, FakeHost, mixed_image, nbd_export, run

from pvebackup.api.types import BitmapMode, GuestType
from pvebackup.kit.hoststate import HostState
from pvebackup.providers.store.bitmap_base import (
    BitmapBase,
    commit_base,
    decide,
    reset_base,
    write_base,
)
from pvebackup.store.backends.memory import MemoryBackend
from pvebackup.store.datastore import Datastore
from pvebackup.store.keys import EncryptionKey
from pvebackup.store.snapshot import MANIFEST_NAME, SnapshotId

CHUNK = 64 * 1024
QEMU = GuestType.QEMU


def _snapshot(store: Datastore, t: int, note: bytes = b"memory: 512\n") -> tuple[SnapshotId, str]:
    sid = SnapshotId(QEMU, 100, t)
    writer = store.new_snapshot(sid, chunk_size=CHUNK)
    writer.add_file("guest.conf", note)
    writer.commit()
    assert writer.manifest_sha256 is not None
    return sid, writer.manifest_sha256


@pytest.fixture(params=[False, True], ids=["plain", "encrypted"])
def store(request: pytest.FixtureRequest) -> Datastore:
    key = EncryptionKey.generate() if request.param else None
    return Datastore.create(MemoryBackend(), key=key, chunk_size=CHUNK)


@pytest.fixture
def state(tmp_path: Path) -> HostState:
    return HostState("backup-store", "store1", tmp_path / "state")


def _committed(store: Datastore, state: HostState) -> tuple[SnapshotId, SnapshotId, str]:
    """Two snapshots; the bitmap was cleared at the second."""
    s1, sha1 = _snapshot(store, 1000)
    commit_base(store, state, "vm", 100, BitmapBase(s1, sha1, "store-x-aaaaaa"))
    s2, sha2 = _snapshot(store, 2000)
    commit_base(store, state, "vm", 100, BitmapBase(s2, sha2, "store-x-aaaaaa"))
    return s1, s2, sha2


def _full(store: Datastore, state: HostState, reason: str) -> None:
    d = decide(store, state, QEMU, 100, CHUNK)
    assert (d.bitmap_id, d.base, d.level) == (None, None, "warn"), d
    assert reason in d.message, d.message


def test_first_backup_starts_a_fresh_chain(store: Datastore, state: HostState) -> None:
    d = decide(store, state, QEMU, 100, CHUNK)
    assert d.base is None and d.level == "info"
    assert d.bitmap_id is not None
    assert d.bitmap_id.startswith(f"store-{store.config.store_id[:8]}-")
    assert decide(store, state, QEMU, 100, CHUNK).bitmap_id != d.bitmap_id  # random part


def test_proven_base_gives_its_chain(store: Datastore, state: HostState) -> None:
    _, s2, sha2 = _committed(store, state)
    d = decide(store, state, QEMU, 100, CHUNK)
    assert (d.bitmap_id, d.base, d.base_sha256) == ("store-x-aaaaaa", s2, sha2)


def test_rolled_back_store_is_detected(store: Datastore, state: HostState) -> None:
    s1, s2, _ = _committed(store, state)
    # The second snapshot and the record of it vanish; the record names s1 again.
    store.remove_snapshot(s2)
    write_base(store.backend, "vm", 100, BitmapBase(s1, None), store.key)
    _full(store, state, "this host committed vm/100/")


def test_record_edited_to_an_older_snapshot(store: Datastore, state: HostState) -> None:
    s1, _, _ = _committed(store, state)
    sha1 = hashlib.sha256(store.backend.get(s1.prefix + MANIFEST_NAME)).hexdigest()
    write_base(store.backend, "vm", 100, BitmapBase(s1, sha1), store.key)
    _full(store, state, "names vm/100/1970-01-01T00:16:40Z")


def test_forged_record_without_the_key(store: Datastore, state: HostState) -> None:
    """A record made without the store key: a plain checksum, or another key's MAC."""
    s1, s2, sha2 = _committed(store, state)
    body = {"snapshot": s2.path, "manifest-sha256": sha2, "reason": ""}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    forged = {**body, "mac": "sha256:" + hashlib.sha256(canonical).hexdigest()}
    store.backend.put("provider/backup-store/bitmap-base/vm-100.json",
                      json.dumps(forged).encode(), overwrite=True)  # fmt: skip
    if store.encrypted:
        _full(store, state, "valid signature")
        write_base(store.backend, "vm", 100, BitmapBase(s2, sha2), EncryptionKey.generate())
        _full(store, state, "valid signature")
    else:
        # A plain store cannot authenticate: this record agrees with the host state.
        assert decide(store, state, QEMU, 100, CHUNK).base == s2


@pytest.mark.parametrize("damage", [b"", b"[]", b"{", b'{"snapshot": 5}', b"\xff\xfe"])
def test_damaged_record(store: Datastore, state: HostState, damage: bytes) -> None:
    _committed(store, state)
    store.backend.put("provider/backup-store/bitmap-base/vm-100.json", damage, overwrite=True)
    _full(store, state, "record")


def test_missing_record(store: Datastore, state: HostState) -> None:
    _committed(store, state)
    store.backend.delete("provider/backup-store/bitmap-base/vm-100.json")
    _full(store, state, "record is missing")


def test_replaced_manifest_is_detected(store: Datastore, state: HostState) -> None:
    """Same snapshot name, another manifest (a store rolled back and backed up again)."""
    _, s2, _ = _committed(store, state)
    store.remove_snapshot(s2)
    _snapshot(store, 2000, b"memory: 1024\n")
    _full(store, state, "not the one this host committed")


def test_base_gone(store: Datastore, state: HostState) -> None:
    _, s2, _ = _committed(store, state)
    store.remove_snapshot(s2)
    _full(store, state, "is gone")


def test_missing_state_with_backups_in_the_store(store: Datastore, state: HostState) -> None:
    _committed(store, state)
    state.remove("vm-100")
    _full(store, state, "holds no record of the last backup")


@pytest.mark.parametrize(
    "content", [b"", b"not json", b"[1]", b'{"store-id": 1}', b"\x00" * 70_000]
)
def test_damaged_state(store: Datastore, state: HostState, content: bytes) -> None:
    _committed(store, state)
    state.path("vm-100").write_bytes(content)
    _full(store, state, "state file")


def test_state_of_another_store(store: Datastore, state: HostState) -> None:
    _committed(store, state)
    doc = json.loads(state.path("vm-100").read_text())
    doc["store-id"] = "00000000-0000-0000-0000-000000000000"
    state.path("vm-100").write_text(json.dumps(doc))
    _full(store, state, "of another store")


def test_reset_means_full_without_warning(store: Datastore, state: HostState) -> None:
    _committed(store, state)
    reset_base(store, state, "vm", 100, "a backup that created a new dirty bitmap failed")
    d = decide(store, state, QEMU, 100, CHUNK)
    assert (d.bitmap_id, d.base, d.level) == (None, None, "info")
    assert "created a new dirty bitmap failed" in d.message


def test_other_chunk_size(store: Datastore, state: HostState) -> None:
    _committed(store, state)
    d = decide(store, state, QEMU, 100, 2 * CHUNK)
    assert d.bitmap_id is None and "another chunk size" in d.message


@pytest.mark.e2e
def test_failed_backup_with_a_new_bitmap_resets_the_base(tmp_path: Path) -> None:
    """Provider level: the host answered ``new`` (its bitmap was lost), the backup
    then failed. The new bitmap started after every snapshot; if the provider kept
    its base, a bitmap left behind would be applied to it and miss writes."""
    host = FakeHost(tmp_path, {"type": "backup-store", "path": str(tmp_path / "store"),
                               "chunk-size": str(CHUNK)})  # fmt: skip
    src = mixed_image(tmp_path / "src.qcow2")
    host.backup(src, BitmapMode.NEW, expect_bitmap=True)
    chain = host.mechanism()
    assert chain is not None  # the base is proven: the next backup may be incremental
    p = host.provider()
    p.job_start(0)
    p.backup_start(100, QEMU)
    assert p.backup_get_mechanism(100, QEMU)[1] == chain
    export = tmp_path / "export.qcow2"
    run("cp", "--sparse=always", str(src), str(export))
    with nbd_export(export) as sock:
        p.backup_nbd(100, DEVICE, sock, BitmapMode.NEW, "bm", None)
    p.backup_abort(100, "the next disk failed")
    p.job_end()
    assert host.mechanism() is None
    assert any("created a new dirty bitmap failed" in m for _, m in host.log.lines)
