"""Blob format and chunk codec: round trips, and corrupt input never yields data."""

from __future__ import annotations

import hashlib
import hmac
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pvebackup.api.errors import CorruptChunkError
from pvebackup.store.blob import ChunkCodec, is_zero
from pvebackup.store.formats import (
    BLOB_FLAG_COMPRESSED,
    BLOB_FLAG_ENCRYPTED,
    BLOB_HEADER,
    BLOB_MAGIC,
    ZERO_DIGEST,
)
from pvebackup.store.keys import EncryptionKey

KEY = EncryptionKey(bytes(range(32)))
PLAIN = ChunkCodec(None)
ENC = ChunkCodec(KEY)
data_st = st.binary(min_size=0, max_size=4096) | st.builds(
    lambda b, n: b * n, st.binary(min_size=1, max_size=8), st.integers(1, 2000)
)


def _flags(blob: bytes) -> int:
    return blob[8]


@given(data=data_st, encrypted=st.booleans())
def test_round_trip(data: bytes, encrypted: bool) -> None:
    codec = ENC if encrypted else PLAIN
    blob = codec.encode(data)
    assert blob[:8] == BLOB_MAGIC
    assert codec.decode(blob) == data
    if data and not is_zero(data):
        assert codec.decode_chunk(blob, codec.digest(data)) == data


def test_digest_plain_is_sha256_and_keyed_is_hmac() -> None:
    data = b"some chunk"
    assert PLAIN.digest(data) == hashlib.sha256(data).digest()
    assert ENC.digest(data) == hmac.digest(KEY.id_key, data, "sha256")
    assert ENC.digest(data) != PLAIN.digest(data)


def test_compresses_only_when_it_shrinks() -> None:
    text = b"hello world, " * 10000
    assert _flags(PLAIN.encode(text)) & BLOB_FLAG_COMPRESSED
    assert len(PLAIN.encode(text)) < len(text) // 10
    noise = os.urandom(65536)
    blob = PLAIN.encode(noise)
    assert not _flags(blob) & BLOB_FLAG_COMPRESSED
    assert blob[BLOB_HEADER.size :] == noise


def test_encrypted_blob_hides_plaintext_and_uses_fresh_nonces() -> None:
    data = b"secret guest data " * 1000
    a, b = ENC.encode(data), ENC.encode(data)
    assert _flags(a) & BLOB_FLAG_ENCRYPTED
    assert a[16:28] != b[16:28]  # nonce
    assert a != b
    assert b"secret" not in a


def test_zero_chunk_is_not_encoded() -> None:
    p = PLAIN.prepare(bytes(4096))
    assert p.is_zero and p.digest == ZERO_DIGEST and p.blob is None and p.size == 4096
    assert not PLAIN.prepare(b"\0" * 4095 + b"\1").is_zero
    assert is_zero(b"") and is_zero(bytearray(10)) and not is_zero(memoryview(b"\0\1"))


@settings(max_examples=200)
@given(data=st.binary(min_size=1, max_size=2048), encrypted=st.booleans(), pos=st.data())
def test_any_bit_flip_is_rejected(data: bytes, encrypted: bool, pos: st.DataObject) -> None:
    codec = ENC if encrypted else PLAIN
    digest = codec.digest(data)
    blob = bytearray(codec.encode(data))
    bit = pos.draw(st.integers(0, len(blob) * 8 - 1))
    blob[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(CorruptChunkError, match=digest.hex()):
        codec.decode_chunk(bytes(blob), digest)


@given(data=st.binary(min_size=1, max_size=512), cut=st.integers(0, 600))
def test_truncated_blob_is_rejected(data: bytes, cut: int) -> None:
    blob = PLAIN.encode(data)
    if cut >= len(blob):
        cut = len(blob) - 1
    with pytest.raises(CorruptChunkError):
        PLAIN.decode_chunk(blob[:cut], PLAIN.digest(data))


def test_blob_under_another_name_is_rejected() -> None:
    blob = PLAIN.encode(b"chunk A")
    with pytest.raises(CorruptChunkError, match="does not match its digest"):
        PLAIN.decode_chunk(blob, PLAIN.digest(b"chunk B"))


def test_wrong_key_and_store_mismatch_are_rejected() -> None:
    blob = ENC.encode(b"data" * 100)
    with pytest.raises(CorruptChunkError, match="authentication failed"):
        ChunkCodec(EncryptionKey(bytes(32))).decode(blob)
    with pytest.raises(CorruptChunkError, match="encrypted blob"):
        PLAIN.decode(blob)
    with pytest.raises(CorruptChunkError, match="unencrypted blob"):
        ENC.decode(PLAIN.encode(b"data"))


def test_declared_size_bound_protects_decompression() -> None:
    # A forged header claiming a huge size is refused before any allocation.
    blob = bytearray(PLAIN.encode(b"x" * 1000))
    BLOB_HEADER.struct.pack_into(
        blob, 0, BLOB_MAGIC, BLOB_FLAG_COMPRESSED, 0, 0, 1 << 30, bytes(12), 0
    )
    with pytest.raises(CorruptChunkError, match="exceeds"):
        PLAIN.decode(bytes(blob))


def test_encode_refuses_oversized_input() -> None:
    with pytest.raises(ValueError):
        PLAIN.encode(bytes(16 * 1024 * 1024 + 1))
