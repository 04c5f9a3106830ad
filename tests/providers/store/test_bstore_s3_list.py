"""``list`` of a store on RGW: a bounded number of requests, a cache that another
node's writes cannot make stale, rebuilt when it is missing or damaged."""

from __future__ import annotations

from pathlib import Path

import pytest

from pvebackup.api.types import GuestType
from pvebackup.kit.annotations import NOTES_MAX
from pvebackup.providers.store.plugin import BackupStorePlugin
from pvebackup.storage.plugin import VolumeInfo
from pvebackup.store import annotations as sidecars
from pvebackup.store.backends.retry import RetryBackend
from pvebackup.store.backends.s3 import S3Backend, S3Config
from pvebackup.store.datastore import Datastore
from pvebackup.store.keys import EncryptionKey
from pvebackup.store.snapshot import SnapshotId
from pvebackup.testing.rgw import request_counts
from s3fixture import S3Server

pytestmark = pytest.mark.s3

T0 = 1795685400
SNAPSHOTS = 40


def _scfg(tmp_path: Path, server: S3Server, bucket: str) -> dict[str, str]:
    cred = tmp_path / "s3.cred"
    cred.write_text(f"access-key = {server.access_key}\nsecret-key = {server.secret_key}\n")
    cred.chmod(0o600)
    return {
        "type": "backup-store", "s3-endpoint": server.endpoint, "s3-bucket": bucket,
        "s3-credentials": str(cred), "cache-dir": str(tmp_path / "cache"),
    }  # fmt: skip


def _node(server: S3Server, bucket: str) -> Datastore:
    """Another node's view of the bucket (its own client, no cache)."""
    return Datastore.open(RetryBackend(S3Backend(
        S3Config(server.endpoint, bucket),
        access_key=server.access_key, secret_key=server.secret_key,
    )))  # fmt: skip


def _fill(server: S3Server, bucket: str) -> list[SnapshotId]:
    backend = S3Backend(S3Config(server.endpoint, bucket),
                        access_key=server.access_key, secret_key=server.secret_key)
    store = Datastore.create(RetryBackend(backend), chunk_size=64 * 1024)
    sids = []
    for n in range(SNAPSHOTS):
        sid = SnapshotId(GuestType.QEMU, 100 + n % 4, T0 + n)
        with store.new_snapshot(sid) as w:
            w.add_file("guest.conf", f"name: vm{n}\n".encode())
        sids.append(sid)
    sidecars.write_notes(store, sids[3], "first note")
    store.close()
    return sids


def _scan(scfg: dict[str, str], server: S3Server) -> tuple[list[VolumeInfo], dict[str, int]]:
    before = request_counts(server)
    volumes = BackupStorePlugin().list_volumes(scfg, "s3st")
    after = request_counts(server)
    return volumes, {k: after[k] - before[k] for k in after}


def test_list_costs_a_bounded_number_of_requests_and_sees_other_nodes(
    tmp_path: Path, s3_server: S3Server, s3_bucket: str
) -> None:
    sids = _fill(s3_server, s3_bucket)
    scfg = _scfg(tmp_path, s3_server, s3_bucket)
    cold, cold_cost = _scan(scfg, s3_server)
    assert len(cold) == SNAPSHOTS
    assert {v.notes for v in cold} == {"", "first note"}
    # Cold: every manifest (and the one note) is read once.
    assert cold_cost["get"] >= SNAPSHOTS

    warm, cost = _scan(scfg, s3_server)
    assert warm == cold
    # Warm: is the store empty (a LIST, twice), config.json (HEAD + GET: RGW
    # counts HEAD as a get), snapshots/ (1 LIST: fewer than 1000 keys). Uncached,
    # this was ~6 requests per snapshot.
    assert cost["get"] == 2, cost
    assert cost["req"] <= 5, cost

    # Another node changes notes and protection, and removes a snapshot.
    other = _node(s3_server, s3_bucket)
    sidecars.write_notes(other, sids[3], "changed elsewhere")
    sidecars.write_notes(other, sids[5], "new elsewhere")
    sidecars.set_protected(other, sids[7], True)
    other.remove_snapshot(sids[9])
    other.close()
    seen, cost = _scan(scfg, s3_server)
    by_volid = {v.volid: v for v in seen}
    assert len(seen) == SNAPSHOTS - 1
    assert f"s3st:{sids[9].volname}" not in by_volid
    assert by_volid[f"s3st:{sids[3].volname}"].notes == "changed elsewhere"
    assert by_volid[f"s3st:{sids[5].volname}"].notes == "new elsewhere"
    assert by_volid[f"s3st:{sids[7].volname}"].protected
    assert cost["get"] == 2 + 2, cost  # config.json and the two changed notes


def test_a_tampered_or_missing_cache_is_rebuilt_from_the_bucket(
    tmp_path: Path, s3_server: S3Server, s3_bucket: str
) -> None:
    _fill(s3_server, s3_bucket)
    scfg = _scfg(tmp_path, s3_server, s3_bucket)
    first, _ = _scan(scfg, s3_server)
    meta = next((tmp_path / "cache" / "metacache").iterdir())
    entries = sorted(meta.iterdir())
    assert len(entries) == SNAPSHOTS + 1  # the manifests and the note
    # Hostile bytes in a cache entry (right header, other content): a miss, read again.
    for entry in entries[:5]:
        raw = entry.read_bytes()
        head = raw.partition(b"\n")[0]
        entry.write_bytes(head + b"\n" + b"{}" + raw[len(head) + 3 :])
    again, cost = _scan(scfg, s3_server)
    assert again == first
    assert cost["get"] == 2 + 5, cost
    # Gone entirely: rebuilt.
    for entry in meta.iterdir():
        entry.unlink()
    meta.rmdir()
    rebuilt, cost = _scan(scfg, s3_server)
    assert rebuilt == first
    assert cost["get"] == 2 + SNAPSHOTS + 1, cost


def test_an_oversized_planted_note_is_never_read(
    tmp_path: Path, s3_server: S3Server, s3_bucket: str
) -> None:
    backend = S3Backend(S3Config(s3_server.endpoint, s3_bucket),
                        access_key=s3_server.access_key, secret_key=s3_server.secret_key)
    store = Datastore.create(RetryBackend(backend), chunk_size=64 * 1024)
    sids = [SnapshotId(GuestType.QEMU, 100, T0 + n) for n in range(3)]
    for sid in sids:
        with store.new_snapshot(sid) as w:
            w.add_file("guest.conf", b"name: vm\n")
    store.close()
    # Whoever can write the bucket plants a huge note: the listing's size is
    # checked before any read (a GET of it would cost transfer and memory).
    backend.put(sids[1].prefix + "notes", b"x" * (NOTES_MAX + 1), overwrite=True)
    volumes, cost = _scan(_scfg(tmp_path, s3_server, s3_bucket), s3_server)
    assert [v.notes for v in volumes] == ["", "", ""]
    assert cost["get"] == 2 + len(sids), cost  # config.json (HEAD, GET) and the manifests


def test_an_encrypted_store_lists_without_its_key_through_the_cache(
    tmp_path: Path, s3_server: S3Server, s3_bucket: str
) -> None:
    backend = S3Backend(S3Config(s3_server.endpoint, s3_bucket),
                        access_key=s3_server.access_key, secret_key=s3_server.secret_key)
    store = Datastore.create(RetryBackend(backend), key=EncryptionKey.generate(),
                             chunk_size=64 * 1024)  # fmt: skip
    sids = [SnapshotId(GuestType.QEMU, 100, T0 + n) for n in range(4)]
    for sid in sids:
        with store.new_snapshot(sid) as w:
            w.add_file("guest.conf", b"name: vm\n")
    store.close()
    scfg = _scfg(tmp_path, s3_server, s3_bucket)  # no encryption-key: keyless listing
    cold, _ = _scan(scfg, s3_server)
    warm, cost = _scan(scfg, s3_server)
    assert [v.volid for v in warm] == [f"s3st:{s.volname}" for s in sids]
    assert warm == cold
    assert all("listed without the key" in (v.comment or "") for v in warm)
    # config.json only (twice: opened with a key first, then keyless); the
    # manifests came from the cache.
    assert cost["get"] == 4, cost
