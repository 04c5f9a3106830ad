"""Snapshot names and manifests: round trips, signatures, rejection of damage."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pvebackup.api.errors import CorruptIndexError, MissingKeyError, WrongKeyError
from pvebackup.api.types import GuestType
from pvebackup.store.keys import EncryptionKey
from pvebackup.store.snapshot import FileEntry, Manifest, SnapshotDevice, SnapshotId

KEY = EncryptionKey(bytes(range(32)))
OTHER = EncryptionKey(bytes(range(1, 33)))

ids = st.builds(
    SnapshotId,
    st.sampled_from(list(GuestType)),
    st.integers(1, 999_999_999),
    st.integers(0, 4_102_444_800),
)
names = st.from_regex(r"[a-z][a-z0-9-]{0,10}", fullmatch=True)
manifests = st.builds(
    Manifest,
    snapshot=ids,
    created=st.integers(0, 2**40),
    encrypted=st.just(False),
    key_fingerprint=st.none(),
    chunk_size=st.sampled_from([65536, 262144, 1 << 20]),
    # Within what a reader accepts: an index of at most MAX_INDEX_CHUNKS chunks
    # (the smallest chunk size here), named after its device; blobs of one chunk.
    devices=st.dictionaries(names, st.integers(0, 2**42)).map(
        lambda d: {k: SnapshotDevice(size, f"{k}.fidx") for k, size in d.items()}
    ),
    files=st.dictionaries(
        names,
        st.builds(
            FileEntry,
            st.integers(0, 2**24),
            st.text("0123456789abcdef", min_size=64, max_size=64),
            st.sampled_from(["index", "blob"]),
        ),
    ),
    bitmap_id=st.none() | names,
    parent=st.none() | ids,
    metadata=st.dictionaries(names, st.text(max_size=20)),
)


def _encrypted(m: Manifest, key: EncryptionKey) -> Manifest:
    return Manifest(**{**m.__dict__, "encrypted": True, "key_fingerprint": key.fingerprint})


def test_names_and_volnames() -> None:
    sid = SnapshotId(GuestType.QEMU, 100, 1795685400)
    assert sid.path == "vm/100/2026-11-26T09:30:00Z"
    assert sid.volname == "backup/vm-100-2026-11-26T09:30:00Z"
    assert sid.prefix == "snapshots/vm/100/2026-11-26T09:30:00Z/"
    ct = SnapshotId(GuestType.LXC, 200, 0)
    assert ct.volname == "backup/ct-200-1970-01-01T00:00:00Z"


@given(ids)
def test_name_round_trips(sid: SnapshotId) -> None:
    assert SnapshotId.parse(sid.path) == sid
    assert SnapshotId.from_volname(sid.volname) == sid


@pytest.mark.parametrize(
    "bad",
    [
        "vm/100",
        "xx/100/2026-11-26T09:30:00Z",
        "vm/0100/2026-11-26T09:30:00Z",
        "vm/100/2026-11-26T09:30:00",
        "vm/100/2026-13-26T09:30:00Z",
        "vm/100/2026-11-26T09:30:00Z/x",
    ],
)
def test_bad_names(bad: str) -> None:
    with pytest.raises(ValueError):
        SnapshotId.parse(bad)


@settings(max_examples=50)
@given(manifests)
def test_manifest_round_trip(m: Manifest) -> None:
    assert Manifest.from_bytes(m.to_bytes(None), None, name="t") == m
    e = _encrypted(m, KEY)
    data = e.to_bytes(KEY)
    assert b'"checksum":"hmac-sha256:' in data
    assert Manifest.from_bytes(data, KEY, name="t") == e


@settings(max_examples=100)
@given(m=manifests, encrypted=st.booleans(), pos=st.data())
def test_manifest_bit_flips_are_rejected(m: Manifest, encrypted: bool, pos: st.DataObject) -> None:
    key = KEY if encrypted else None
    data = bytearray((_encrypted(m, KEY) if encrypted else m).to_bytes(key))
    bit = pos.draw(st.integers(0, len(data) * 8 - 1))
    data[bit // 8] ^= 1 << (bit % 8)
    # A flip inside the fingerprint legitimately reads as "another key".
    errors = (CorruptIndexError, WrongKeyError) if encrypted else CorruptIndexError
    with pytest.raises(errors):
        Manifest.from_bytes(bytes(data), key, name="t")


def _sample() -> Manifest:
    return Manifest(
        snapshot=SnapshotId(GuestType.QEMU, 100, 1795685400),
        created=1,
        encrypted=True,
        key_fingerprint=KEY.fingerprint,
        chunk_size=262144,
        devices={"drive-scsi0": SnapshotDevice(1 << 30, "drive-scsi0.fidx")},
        files={},
    )


def test_wrong_missing_key_and_stripped_signature() -> None:
    data = _sample().to_bytes(KEY)
    with pytest.raises(WrongKeyError, match=KEY.fingerprint):
        Manifest.from_bytes(data, OTHER, name="t")
    with pytest.raises(MissingKeyError):
        Manifest.from_bytes(data, None, name="t")
    plain = Manifest(**{**_sample().__dict__, "encrypted": False, "key_fingerprint": None})
    with pytest.raises(CorruptIndexError, match="unsigned"):
        Manifest.from_bytes(plain.to_bytes(None), KEY, name="t")


def test_forged_content_with_recomputed_plain_checksum_is_rejected() -> None:
    # An attacker without the key cannot re-sign an encrypted manifest.
    forged = Manifest(**{**_sample().__dict__, "chunk_size": 65536})
    data = forged.to_bytes(OTHER).replace(OTHER.fingerprint.encode(), KEY.fingerprint.encode())
    with pytest.raises(CorruptIndexError):
        Manifest.from_bytes(data, KEY, name="t")
