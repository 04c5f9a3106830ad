"""Fuzzing the chunk store's parsers: fixed index, manifest (plain and signed),
snapshot names, store config, blob headers.

Property (issue 8): success or a typed ``PveBackupError``, never another exception,
and bounded memory for inputs that claim huge sizes. The attacker model is a
writer of the storage: in a plain store it can recompute the manifest's SHA-256
checksum (it is no authentication), so structured mutations are re-checksummed
and reach the field checks behind it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import struct
from typing import Any

import pytest
import zstandard
from hypothesis import given
from hypothesis import strategies as st

from fuzzing import FUZZ, hostile_json_bytes, mutated, peak_memory, typed_or_ok
from pvebackup.api.errors import (
    CorruptChunkError,
    CorruptIndexError,
    PveBackupError,
    UnsupportedError,
)
from pvebackup.api.types import GuestType
from pvebackup.store.backends.memory import MemoryBackend
from pvebackup.store.blob import ChunkCodec
from pvebackup.store.datastore import CONFIG_KEY, Datastore, StoreConfig
from pvebackup.store.formats import (
    BLOB_HEADER,
    BLOB_MAGIC,
    FIXED_INDEX_HEADER,
    MAX_INDEX_CHUNKS,
)
from pvebackup.store.index import FixedIndex, FixedIndexWriter
from pvebackup.store.keys import EncryptionKey
from pvebackup.store.snapshot import MANIFEST_NAME, Manifest, SnapshotId

KEY = EncryptionKey(bytes(range(32)))
CS = 64 * 1024
T0 = 1795685400
SID = SnapshotId(GuestType.QEMU, 100, T0)
MiB = 1024 * 1024
# Generous for what the parsers themselves need; far below what a forged size
# would make them allocate (hundreds of MiB to TiB).
MEMORY_LIMIT = 32 * MiB



def _store(key: EncryptionKey | None = None) -> tuple[MemoryBackend, Datastore]:
    backend = MemoryBackend()
    store = Datastore.create(backend, key=key, chunk_size=CS)
    with store.new_snapshot(SID) as w:
        with w.index_writer("drive-scsi0", 3 * CS + 100) as iw:
            iw.set(1, store.insert_chunk(b"\x01" * CS).digest)
        w.add_file("guest.conf", b"memory: 512\n")
    return backend, store


def _resign_plain(doc: Any) -> bytes:
    """What a writer of a plain store can do: re-canonicalise and re-checksum."""
    body = {k: v for k, v in doc.items() if k != "checksum"} if isinstance(doc, dict) else doc
    canon = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
    if isinstance(body, dict):
        body = {**body, "checksum": "sha256:" + hashlib.sha256(canon).hexdigest()}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode() + (
        b"\n"
    )


def _read_everything(store: Datastore) -> None:
    """What list and restore do with a snapshot: open it, its indexes and files."""
    snap = store.open_snapshot(SID)
    for device in snap.devices:
        index = snap.open_index(device)
        for i in range(min(len(index), 4)):
            store.read_chunk(index.digest(i), index.extent(i)[1])
    for name in snap.file_names():
        snap.read_file(name)


# --- fixed index ------------------------------------------------------------------

_VALID_INDEX = FixedIndexWriter(5 * CS + 7, CS).to_bytes()
_HDR = FIXED_INDEX_HEADER.struct


@st.composite
def _index_bytes(draw: st.DrawFn) -> bytes:
    how = draw(st.sampled_from(["field", "field", "flip", "cut", "raw"]))
    if how == "raw":
        return draw(st.binary(max_size=2048))
    data = bytearray(_VALID_INDEX)
    if how == "cut":
        return bytes(data[: draw(st.integers(0, len(data)))])
    if how == "flip":
        i = draw(st.integers(0, len(data) - 1))
        data[i] ^= draw(st.integers(1, 255))
        return bytes(data)
    fields = list(_HDR.unpack_from(data))
    i = draw(st.sampled_from([2, 3, 4, 5]))  # ctime, size, chunk_size, flags
    fmt = FIXED_INDEX_HEADER.fields[i].code
    bits = struct.calcsize("<" + fmt) * 8
    signed = fmt.islower()
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    fields[i] = draw(st.integers(lo, hi) | st.sampled_from([lo, hi, 0]))
    _HDR.pack_into(data, 0, *fields)
    return bytes(data)


@FUZZ
@given(_index_bytes())
def test_fixed_index_parser_is_typed(data: bytes) -> None:
    result = typed_or_ok(lambda: FixedIndex(data, name="fuzz"))
    assert isinstance(result, FixedIndex | CorruptIndexError)


def test_fixed_index_claiming_more_chunks_than_allowed_is_refused_before_work() -> None:
    # The header says 2**64-1 bytes; the file is a header only. Refused by the cap
    # on the claimed size, naming the limit, not by arithmetic on the claim.
    fields = list(_HDR.unpack_from(_VALID_INDEX))
    fields[3] = 2**64 - 1
    data = _HDR.pack(*fields)
    with pytest.raises(CorruptIndexError, match=f"at most {MAX_INDEX_CHUNKS} chunks"):
        FixedIndex(data, name="t")
    with pytest.raises(ValueError, match="out of range"):
        FixedIndexWriter(MAX_INDEX_CHUNKS * CS + 1, CS)


# --- stored index: bounded inflation -----------------------------------------------


def _with_index(backend: MemoryBackend, compressed: bytes, device_size: int) -> None:
    """Replace the snapshot's index by ``compressed`` and fix up the manifest, as a
    writer of a plain store can."""
    key = SID.prefix + MANIFEST_NAME
    doc = json.loads(backend.get(key))
    backend.put(SID.prefix + "drive-scsi0.fidx", compressed, overwrite=True)
    doc["devices"]["drive-scsi0"]["size"] = device_size
    doc["files"]["drive-scsi0.fidx"] = {
        "kind": "index",
        "sha256": hashlib.sha256(compressed).hexdigest(),
        "size": len(compressed),
    }
    backend.put(key, _resign_plain(doc), overwrite=True)


def test_index_frame_declaring_a_huge_size_is_refused_before_allocation() -> None:
    # zstd allocates what a frame header declares and then ignores
    # max_output_size: a 40-byte file declaring 1 TiB must not reach decompress.
    backend, store = _store()
    # A frame header declaring 2**40 bytes: magic, descriptor 0xE0 (single segment,
    # 8-byte content size), the size, then one empty last block.
    magic = (0xFD2FB528).to_bytes(4, "little")
    bomb = magic + b"\xe0" + (2**40).to_bytes(8, "little") + b"\x01\x00\x00"
    assert zstandard.frame_content_size(bomb) == 2**40
    _with_index(backend, bomb, 3 * CS + 100)
    peak = peak_memory(lambda: store.open_snapshot(SID).open_index("drive-scsi0"))
    assert peak < MEMORY_LIMIT
    with pytest.raises(CorruptIndexError, match="declares"):
        store.open_snapshot(SID).open_index("drive-scsi0")


def test_index_inflation_is_bounded_by_the_image_size_in_the_manifest() -> None:
    # 128 MiB of zeros compress to a few KiB; the manifest says the disk is tiny.
    backend, store = _store()
    bomb = zstandard.ZstdCompressor(level=1).compress(bytes(128 * MiB))
    _with_index(backend, bomb, 3 * CS + 100)
    peak = peak_memory(lambda: store.open_snapshot(SID).open_index("drive-scsi0"))
    assert peak < MEMORY_LIMIT
    with pytest.raises(CorruptIndexError):
        store.open_snapshot(SID).open_index("drive-scsi0")


def test_index_frame_without_a_declared_size_is_refused() -> None:
    backend, store = _store()
    frame = zstandard.ZstdCompressor(write_content_size=False).compress(bytes(1 << 20))
    _with_index(backend, frame, 3 * CS + 100)
    with pytest.raises(CorruptIndexError):
        store.open_snapshot(SID).open_index("drive-scsi0")


def test_manifest_claiming_a_disk_beyond_the_index_cap_is_refused() -> None:
    backend, store = _store()
    doc = json.loads(backend.get(SID.prefix + MANIFEST_NAME))
    doc["devices"]["drive-scsi0"]["size"] = (MAX_INDEX_CHUNKS + 1) * CS
    backend.put(SID.prefix + MANIFEST_NAME, _resign_plain(doc), overwrite=True)
    with pytest.raises(CorruptIndexError, match="out of range"):
        store.open_snapshot(SID)


def test_stored_file_swapped_for_a_huge_one_is_not_read() -> None:
    backend, store = _store()

    class Huge(MemoryBackend):
        def get(self, key: str) -> bytes:
            if key.endswith("guest.conf"):
                raise AssertionError("read a file whose size does not match")
            return super().get(key)

    huge = Huge()
    for key in backend.list(""):
        huge.put(key, backend.get(key), overwrite=True)
    huge.put(SID.prefix + "guest.conf", bytes(20 * MiB), overwrite=True)
    snap = Datastore.open(huge).open_snapshot(SID)
    with pytest.raises(CorruptIndexError, match="does not match"):
        snap.read_file("guest.conf")


# --- manifest ----------------------------------------------------------------------

_BACKEND, _PLAIN = _store()
_PLAIN_MANIFEST = json.loads(_BACKEND.get(SID.prefix + MANIFEST_NAME))
_KEYED_BACKEND, _KEYED = _store(KEY)
_SIGNED_MANIFEST = _KEYED_BACKEND.get(SID.prefix + MANIFEST_NAME)


@FUZZ
@given(st.data())
def test_manifest_plain_structured_mutations_are_typed_and_bounded(data: st.DataObject) -> None:
    doc = data.draw(mutated(_PLAIN_MANIFEST))
    backend = MemoryBackend()
    for key in _BACKEND.list(""):
        backend.put(key, _BACKEND.get(key), overwrite=True)
    backend.put(SID.prefix + MANIFEST_NAME, _resign_plain(doc), overwrite=True)
    store = Datastore.open(backend)
    assert peak_memory(lambda: _read_everything(store)) < MEMORY_LIMIT


@FUZZ
@given(hostile_json_bytes(_PLAIN_MANIFEST))
def test_manifest_plain_raw_bytes_are_typed(raw: bytes) -> None:
    result = typed_or_ok(lambda: Manifest.from_bytes(raw, None, name="fuzz"))
    assert isinstance(result, Manifest | PveBackupError)


@FUZZ
@given(st.data())
def test_manifest_signed_form_is_typed(data: st.DataObject) -> None:
    # Without the key a mutation cannot be re-signed: whatever is changed, the
    # signature check (or the parse before it) refuses it with a typed error.
    doc = json.loads(_SIGNED_MANIFEST)
    raw = data.draw(
        hostile_json_bytes(doc)
        | mutated(doc).map(lambda d: json.dumps(d, sort_keys=True, separators=(",", ":")).encode())
    )
    result = typed_or_ok(lambda: Manifest.from_bytes(raw, KEY, name="fuzz"))
    if raw != _SIGNED_MANIFEST:
        assert isinstance(result, PveBackupError)


@FUZZ
@given(st.data())
def test_manifest_signed_with_the_key_but_malformed_is_typed(data: st.DataObject) -> None:
    # A malformed document that does carry a valid signature (a bug of a writer
    # holding the key) still gets field checks, not a traceback.
    doc = data.draw(mutated(json.loads(_SIGNED_MANIFEST)))
    if not isinstance(doc, dict):
        return
    body = {k: v for k, v in doc.items() if k != "checksum"}
    canon = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
    body["checksum"] = "hmac-sha256:" + hmac.digest(KEY.signing_key, canon, "sha256").hex()
    raw = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
    result = typed_or_ok(lambda: Manifest.from_bytes(raw + b"\n", KEY, name="fuzz"))
    assert isinstance(result, Manifest | PveBackupError)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        (("devices",), []),
        (("devices", "drive-scsi0", "size"), "3"),
        (("devices", "drive-scsi0", "size"), -1),
        (("devices", "drive-scsi0", "size"), 10**30),
        (("devices", "drive-scsi0", "size"), float("nan")),
        (("devices", "drive-scsi0", "index"), "../../config.json"),
        (("files", "guest.conf", "size"), True),
        (("files", "guest.conf", "kind"), "chunk"),
        (("files", "guest.conf", "sha256"), "zz"),
        (("created",), 1.5),
        (("key_fingerprint",), "not a fingerprint"),
        (("metadata",), {"k": 1}),
    ],
)
def test_manifest_wrong_types_are_corrupt_index_errors(field: tuple[str, ...], value: Any) -> None:
    doc = json.loads(json.dumps(_PLAIN_MANIFEST))
    target = doc
    for k in field[:-1]:
        target = target[k]
    target[field[-1]] = value
    with pytest.raises(CorruptIndexError):
        Manifest.from_bytes(_resign_plain(doc), None, name="t")


# --- snapshot names ------------------------------------------------------------------

_TIMES = st.from_regex(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z", fullmatch=True)


@FUZZ
@given(
    st.sampled_from(["vm", "ct", "xx"]),
    st.integers(-5, 10**12).map(str) | st.text(max_size=12),
    _TIMES | st.text(max_size=25),
)
def test_snapshot_names_parse_or_value_error(kind: str, vmid: str, when: str) -> None:
    # SnapshotId.parse's contract is ValueError (callers map it to a typed error);
    # an impossible date (2026-02-31) is no exception to that.
    for text in (f"{kind}/{vmid}/{when}", f"backup/{kind}-{vmid}-{when}"):
        try:
            sid = SnapshotId.parse(text) if "/" in text[:3] else SnapshotId.from_volname(text)
        except ValueError:
            continue
        assert sid.path == text or sid.volname == text


@FUZZ
@given(st.lists(st.text(st.sampled_from("vmct/0123456789-:TZ"), max_size=40), max_size=8))
def test_store_listing_skips_and_reports_any_key_layout(paths: list[str]) -> None:
    backend, store = _store()
    for p in paths:
        key = f"snapshots/{p}/{MANIFEST_NAME}"
        try:
            backend.put(key, b"{}", overwrite=True)
        except PveBackupError:
            continue  # not even a valid backend key
    skipped: list[tuple[str, str]] = []
    found = store.list_snapshots(on_skip=lambda key, why: skipped.append((key, why)))
    assert SID in found


def test_store_listing_reports_an_impossible_date() -> None:
    backend, store = _store()
    backend.put(f"snapshots/vm/101/2026-02-31T00:00:00Z/{MANIFEST_NAME}", b"{}", overwrite=True)
    skipped: list[tuple[str, str]] = []
    assert store.list_snapshots(on_skip=lambda key, why: skipped.append((key, why))) == [SID]
    assert [k for k, _ in skipped] == ["snapshots/vm/101/2026-02-31T00:00:00Z"]


# --- store config --------------------------------------------------------------------

_CONFIG = json.loads(StoreConfig.from_bytes(_BACKEND.get(CONFIG_KEY)).to_bytes())


@FUZZ
@given(hostile_json_bytes(_CONFIG))
def test_store_config_is_typed(raw: bytes) -> None:
    backend = MemoryBackend()
    backend.put(CONFIG_KEY, raw, overwrite=True)
    result = typed_or_ok(lambda: Datastore.open(backend))
    assert isinstance(result, Datastore | PveBackupError)


def test_store_config_wrong_types_are_refused_not_coerced() -> None:
    for field, value in [("chunk_size", "65536"), ("created", float("inf")), ("store_id", 5),
                         ("compression_level", 10**9), ("encrypted", "yes")]:  # fmt: skip
        doc = {**_CONFIG, field: value}
        with pytest.raises(CorruptIndexError):
            StoreConfig.from_bytes(json.dumps(doc).encode())


def test_store_config_that_is_huge_is_not_read() -> None:
    backend = MemoryBackend()
    backend.put(CONFIG_KEY, b" " * (2 * MiB), overwrite=True)
    with pytest.raises(CorruptIndexError, match="more than"):
        Datastore.open(backend)


# --- blob headers --------------------------------------------------------------------

_BLOB_HDR = BLOB_HEADER.struct


@st.composite
def _blobs(draw: st.DrawFn, encrypted: bool) -> bytes:
    codec = ChunkCodec(KEY if encrypted else None)
    valid = bytearray(codec.encode(draw(st.sampled_from([b"a" * 1000, bytes(range(256))]))))
    how = draw(st.sampled_from(["field", "field", "flip", "cut", "raw", "zstd"]))
    if how == "raw":
        return draw(st.binary(max_size=200))
    if how == "cut":
        return bytes(valid[: draw(st.integers(0, len(valid)))])
    if how == "flip":
        valid[draw(st.integers(0, len(valid) - 1))] ^= draw(st.integers(1, 255))
        return bytes(valid)
    if how == "zstd":  # a well-formed header over a hostile frame (plain store)
        size = draw(st.integers(0, 2**32 - 1))
        body = draw(st.binary(max_size=64))
        return _BLOB_HDR.pack(BLOB_MAGIC, 1, 0, 0, size, bytes(12), 0) + body
    fields = list(_BLOB_HDR.unpack_from(valid))
    i = draw(st.sampled_from([1, 2, 3, 4, 6]))
    bits = struct.calcsize("<" + BLOB_HEADER.fields[i].code) * 8
    fields[i] = draw(st.integers(0, 2**bits - 1))
    _BLOB_HDR.pack_into(valid, 0, *fields)
    return bytes(valid)


@FUZZ
@given(st.booleans().flatmap(lambda enc: st.tuples(st.just(enc), _blobs(enc))))
def test_blob_decoding_is_typed_and_bounded(case: tuple[bool, bytes]) -> None:
    encrypted, blob = case
    codec = ChunkCodec(KEY if encrypted else None)
    result = typed_or_ok(lambda: codec.decode(blob, name="fuzz"))
    assert isinstance(result, bytes | CorruptChunkError)
    assert peak_memory(lambda: codec.decode(blob, name="fuzz")) < MEMORY_LIMIT



def test_writing_an_index_a_reader_would_refuse_is_unsupported() -> None:
    _, store = _store()
    writer = store.new_snapshot(SnapshotId(GuestType.QEMU, 105, T0))
    with pytest.raises(UnsupportedError, match="larger chunk-size"):
        writer.index_writer("drive-scsi0", MAX_INDEX_CHUNKS * CS + 1)
