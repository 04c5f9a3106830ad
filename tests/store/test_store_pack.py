"""Packs and chunk index objects: round trips, rebuild from packs, hostile bytes."""

from __future__ import annotations

import hashlib
import math
import os
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pvebackup.api.errors import CorruptIndexError
from pvebackup.store.backends.memory import MemoryBackend
from pvebackup.store.blob import ChunkCodec
from pvebackup.store.chunkindex import (
    encode_index_object,
    index_key,
    parse_index_object,
)
from pvebackup.store.datastore import Datastore
from pvebackup.store.formats import PACK_ENTRY
from pvebackup.store.gcrecord import encode_record, parse_record, parse_session
from pvebackup.store.keys import EncryptionKey
from pvebackup.store.pack import PackBuilder, pack_key, read_pack_entries

CS = 64 * 1024


def _chunk(i: int) -> bytes:
    return (f"chunk {i} ".encode() * CS)[:CS]


@pytest.fixture(params=[False, True], ids=["plain", "encrypted"])
def store(request: pytest.FixtureRequest, key: EncryptionKey) -> Datastore:
    return Datastore.create(
        MemoryBackend(), key=key if request.param else None, chunk_size=CS, pack_size=1 << 20
    )


def _pack(codec: ChunkCodec, n: int) -> tuple[bytes, bytes, PackBuilder]:
    b = PackBuilder(codec)
    for i in range(n):
        data = _chunk(i)
        b.add(codec.digest(data), codec.encode(data), len(data))
    name, raw = b.finish()
    return name, raw, b


def test_pack_round_trip_and_name_is_its_hash(store: Datastore) -> None:
    name, raw, builder = _pack(store.codec, 5)
    assert name == hashlib.sha256(raw).digest()
    store.backend.put(pack_key(name), raw, overwrite=False)
    assert read_pack_entries(store.backend, store.codec, name) == builder.entries
    e = builder.entries[3]
    blob = store.backend.get_range(pack_key(name), e.offset, e.length)
    assert store.codec.decode_chunk(blob, e.digest) == _chunk(3)


def test_encrypted_pack_shows_no_digest(key: EncryptionKey) -> None:
    codec = ChunkCodec(key)
    _, raw, builder = _pack(codec, 5)
    assert all(e.digest not in raw for e in builder.entries)
    _, plain_raw, plain = _pack(ChunkCodec(None), 5)
    assert all(e.digest in plain_raw for e in plain.entries)  # the test can see them


def test_index_rebuilt_from_packs_equals_index_objects_and_cache(store: Datastore) -> None:
    digests = [store.insert_chunk(os.urandom(CS)).digest for _ in range(40)]
    digests += [store.insert_chunk(_chunk(i)).digest for i in range(10)]
    store.flush()
    assert len(store.pack_names()) >= 3  # 1 MiB target: random chunks fill several
    rebuilt = store.rebuild_index_from_packs()
    assert rebuilt == store.index_entries()
    assert set(rebuilt) == set(digests)
    fresh = Datastore.open(store.backend, key=store.key)
    assert {d: fresh.locate_chunk(d) for d in digests} == rebuilt


def test_forged_description_pointing_outside_the_pack_is_refused() -> None:
    codec = ChunkCodec(None)
    name, raw, builder = _pack(codec, 2)
    backend = MemoryBackend()
    # rebuild the pack with an entry that reaches into the description
    e = builder.entries[1]
    forged = PackBuilder(codec)
    forged.add(builder.entries[0].digest, b"x" * 32, CS)
    forged.entries[0] = type(e)(e.digest, 16, 10_000_000, CS, 0)
    fname, fraw = forged.finish()
    backend.put(pack_key(fname), fraw, overwrite=False)
    with pytest.raises(CorruptIndexError, match="out of bounds"):
        read_pack_entries(backend, codec, fname)
    backend.put(pack_key(name), raw[:-3] + b"\xff\xff\xff", overwrite=False)
    with pytest.raises(CorruptIndexError, match="trailer"):
        read_pack_entries(backend, codec, name)


def test_index_object_round_trip_and_renamed_object_refused(store: Datastore) -> None:
    name, _, builder = _pack(store.codec, 3)
    iname, data = encode_index_object(store.codec, b"s" * 16, [(name, builder.entries)])
    parsed = parse_index_object(store.codec, data, iname)
    assert parsed.session == b"s" * 16
    assert [(d, loc.pack, loc.offset, loc.length) for d, loc in parsed.entries] == [
        (e.digest, name, e.offset, e.length) for e in builder.entries
    ]
    with pytest.raises(CorruptIndexError, match="does not match its name"):
        parse_index_object(store.codec, data, bytes(32))
    store.backend.put(index_key(bytes(32)), data, overwrite=False)
    with pytest.raises(CorruptIndexError):
        store.refresh_index()


def _plain_index_object(body: bytes) -> tuple[ChunkCodec, bytes, bytes]:
    codec = ChunkCodec(None)
    data = codec.encode(body)
    return codec, data, hashlib.sha256(data).digest()


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=400), st.integers(0, 8), st.integers(0, 8))
def test_fuzzed_index_object_is_a_typed_error_or_bounded(
    tail: bytes, packs: int, entries: int
) -> None:
    header = struct.pack(
        "<8s16sqII", bytes.fromhex("8ef51beab624a8cd"), bytes(16), 0, packs, entries
    )
    codec, data, name = _plain_index_object(header + tail)
    try:
        parsed = parse_index_object(codec, data, name)
    except CorruptIndexError:
        return
    for _, loc in parsed.entries:
        assert loc.length >= 32 and loc.size <= 16 << 20


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=300), st.integers(0, 6))
def test_fuzzed_pack_is_a_typed_error_or_in_bounds(body: bytes, count: int) -> None:
    codec = ChunkCodec(None)
    desc_plain = struct.pack("<8sII", bytes.fromhex("a2cc704600bec6fb"), count, 0)
    desc_plain += body[: count * PACK_ENTRY.size]
    desc = codec.encode(desc_plain)
    raw = b"\x01\x8cZ2\xc2o0C" + bytes(8) + body + desc
    raw += struct.pack("<8sII", bytes.fromhex("018c5a32c26f3043"), len(desc), 0)
    backend = MemoryBackend()
    name = hashlib.sha256(raw).digest()
    backend.put(pack_key(name), raw, overwrite=False)
    try:
        entries = read_pack_entries(backend, codec, name)
    except CorruptIndexError:
        return
    for e in entries:
        assert 16 <= e.offset and e.offset + e.length <= len(raw) - 16 - len(desc)


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=300))
def test_fuzzed_session_object_is_a_typed_error(data: bytes) -> None:
    try:
        info = parse_session(data)
    except CorruptIndexError:
        return
    assert all(map(math.isfinite, (info.started, info.heartbeat, info.ttl)))


@pytest.mark.parametrize(
    "doc",
    [b"[]", b'{"session": "x"}', b'{"session": "x", "started": true, "heartbeat": 1, "ttl": 1}',
     b'{"session": "x", "started": NaN, "heartbeat": 1, "ttl": 1}', b"[" * 100000],
)  # fmt: skip
def test_hostile_session_objects_are_refused(doc: bytes) -> None:
    with pytest.raises(CorruptIndexError):
        parse_session(doc)


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=300), st.integers(0, 6))
def test_fuzzed_gc_record_is_a_typed_error(tail: bytes, count: int) -> None:
    codec = ChunkCodec(None)
    header = struct.pack("<8sdII", bytes.fromhex("a6ac9f6e3fe4e3ce"), 1.0, count, 0)
    try:
        record = parse_record(codec, "gc/condemned/x", codec.encode(header + tail))
    except CorruptIndexError:
        return
    assert len(record.pairs) <= count


def test_gc_record_round_trip_and_forged_count(key: EncryptionKey) -> None:
    codec = ChunkCodec(key)
    pairs = {(os.urandom(32), os.urandom(32)) for _ in range(5)}
    ((name, data),) = encode_record(codec, 123.5, pairs)
    record = parse_record(codec, name, data)
    assert (record.created, record.pairs) == (123.5, frozenset(pairs))
    plain = bytearray(codec.decode(data))
    plain[16:20] = (6).to_bytes(4, "little")
    with pytest.raises(CorruptIndexError, match="does not match"):
        parse_record(codec, name, codec.encode(bytes(plain)))
