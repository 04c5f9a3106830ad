"""backup-store: hostile snapshot content gives typed errors, and a listing skips
and reports a damaged snapshot without hiding the others."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fuzzing import FUZZ
from pvebackup.api.errors import CorruptIndexError
from pvebackup.api.types import GuestType
from pvebackup.providers.store.plugin import BackupStorePlugin, _describe
from pvebackup.providers.store.provider import BackupStoreProvider
from pvebackup.store.backends.local import LocalBackend
from pvebackup.store.datastore import Datastore
from pvebackup.store.snapshot import MANIFEST_NAME, SnapshotId

T0 = 1795685400


def _store(tmp_path: Path, configs: dict[int, bytes]) -> tuple[dict[str, str], Path]:
    path = tmp_path / "st"
    path.mkdir()
    store = Datastore.create(LocalBackend(path), chunk_size=64 * 1024)
    for vmid, conf in configs.items():
        with store.new_snapshot(SnapshotId(GuestType.QEMU, vmid, T0)) as w:
            w.add_file("guest.conf", conf)
    return {"type": "backup-store", "path": str(path)}, path


def _provider(scfg: dict[str, str]) -> BackupStoreProvider:
    provider = BackupStorePlugin().new_backup_provider(scfg, "st", lambda level, msg: None)
    assert isinstance(provider, BackupStoreProvider)
    return provider


def test_stored_guest_config_that_is_not_utf8_is_an_integrity_error(tmp_path: Path) -> None:
    scfg, _ = _store(tmp_path, {100: b"memory: \xff\xfe\n", 101: b"memory: 512\n"})
    provider = _provider(scfg)
    with pytest.raises(CorruptIndexError, match="not UTF-8"):
        provider.extract_guest_config("backup/vm-100-2026-11-26T09:30:00Z", "st")
    assert provider.extract_guest_config("backup/vm-101-2026-11-26T09:30:00Z", "st") == (
        "memory: 512\n"
    )


def _rewrite(manifest: Path, change: dict[str, object]) -> None:
    """Change fields and re-sum the manifest, as any writer of a plain store can."""
    doc = json.loads(manifest.read_bytes())
    del doc["checksum"]
    doc.update(change)
    canon = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    doc["checksum"] = "sha256:" + hashlib.sha256(canon).hexdigest()
    manifest.write_bytes(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode() + b"\n")


def test_manifest_claiming_encryption_in_a_plain_store_is_one_damaged_volume(
    tmp_path: Path,
) -> None:
    # Manifest.from_bytes raises MissingKeyError (a CryptoError) for it: the
    # listing must take that as damage of one snapshot, not fail as a whole.
    scfg, path = _store(tmp_path, {100: b"a: 1\n", 101: b"a: 1\n"})
    manifest = path / "snapshots/vm/100/2026-11-26T09:30:00Z" / MANIFEST_NAME
    _rewrite(manifest, {"encrypted": True, "key_fingerprint": "00:11:22:33:44:55:66:77"})
    scan = BackupStorePlugin().scan_volumes(scfg, "st")
    assert [v.vmid for v in scan.volumes] == [101]
    assert [d.volid for d in scan.damaged] == ["st:backup/vm-100-2026-11-26T09:30:00Z"]


@FUZZ
@given(st.text(max_size=30) | st.sampled_from(["²", "1" * 5000, "-1", "1e9", " 5"]))
def test_listing_notes_survive_any_stored_bytes_value(value: str) -> None:
    # metadata values are free strings from the manifest; the note shows a size.
    note = _describe({"stored-bytes": value})
    assert note == "full" or (note.startswith("full, stored ") and value.isdigit())


@pytest.mark.parametrize("kind", ["directory", "huge"])
def test_stored_guest_config_swapped_for_a_directory_or_huge_file_is_typed(
    tmp_path: Path, kind: str
) -> None:
    scfg, path = _store(tmp_path, {100: b"memory: 512\n"})
    conf = path / "snapshots/vm/100/2026-11-26T09:30:00Z/guest.conf"
    conf.unlink()
    if kind == "directory":
        conf.mkdir()
    else:
        with open(conf, "wb") as f:
            f.truncate(1 << 30)
    with pytest.raises(CorruptIndexError):
        _provider(scfg).extract_guest_config("backup/vm-100-2026-11-26T09:30:00Z", "st")
