"""The blob format and the chunk codec: digest, compress, encrypt, and back.

A blob is ``BLOB_HEADER`` (see ``formats``) followed by the payload: the plaintext,
or one zstd frame of it (flag ``compressed``, used only when it is smaller), then,
when the store is encrypted, sealed with AES-256-GCM under a fresh random 96-bit
nonce with the 32 header bytes (which hold the nonce) as associated data, the tag
appended. Compression comes before encryption, so that it still helps.

A chunk's digest (its name in the store) is SHA-256 of its plaintext, or in an
encrypted store HMAC-SHA256 under the key's ``id_key``, so names reveal nothing
about the content. Chunks of only zero bytes get ``ZERO_DIGEST`` and are never
stored. Decoding checks, in this order: header (magic, known flags, flags match the
store, reserved zero, size bound), AEAD tag, zstd frame and its declared size,
plaintext length, and finally the digest; any failure is ``CorruptChunkError``
naming the digest. A blob renamed to another chunk's name fails the last check.

``ChunkCodec`` needs no backend and is safe to use from several threads at once
(hashlib, zstd and AES-GCM release the GIL for large buffers, so two worker
threads use two cores).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
from dataclasses import dataclass
from typing import Final

import zstandard
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from pvebackup.api.errors import CorruptChunkError
from pvebackup.store.formats import (
    BLOB_FLAG_COMPRESSED,
    BLOB_FLAG_ENCRYPTED,
    BLOB_FLAGS_KNOWN,
    BLOB_HEADER,
    BLOB_MAGIC,
    BLOB_NONCE_SIZE,
    BLOB_TAG_SIZE,
    MAX_CHUNK_SIZE,
    ZERO_DIGEST,
)
from pvebackup.store.keys import EncryptionKey

__all__ = ["DEFAULT_COMPRESSION_LEVEL", "BytesLike", "ChunkCodec", "PreparedChunk", "is_zero"]

BytesLike = bytes | bytearray | memoryview
DEFAULT_COMPRESSION_LEVEL: Final = 1

_HDR = BLOB_HEADER.struct
_NO_NONCE: Final = bytes(BLOB_NONCE_SIZE)
_ZEROS: Final = bytes(MAX_CHUNK_SIZE)


def is_zero(data: BytesLike) -> bool:
    """True if ``data`` holds only zero bytes (a memcmp, no Python loop)."""
    n = len(data)
    if n <= MAX_CHUNK_SIZE:
        return memoryview(_ZEROS)[:n] == data
    return bytes(data).count(0) == n


@dataclass(frozen=True, slots=True)
class PreparedChunk:
    """A chunk ready to be stored: its digest, its blob (``None`` for a zero chunk)
    and its plaintext size."""

    digest: bytes
    blob: bytes | None
    size: int

    @property
    def is_zero(self) -> bool:
        return self.blob is None


class ChunkCodec:
    """Digest, encode and verified decode of chunks for one store (its key, if any)."""

    def __init__(self, key: EncryptionKey | None, *, level: int = DEFAULT_COMPRESSION_LEVEL):
        self._key = key
        self._level = level
        self._local = threading.local()

    @property
    def encrypted(self) -> bool:
        return self._key is not None

    def _cctx(self) -> zstandard.ZstdCompressor:
        c: zstandard.ZstdCompressor | None = getattr(self._local, "cctx", None)
        if c is None:
            c = self._local.cctx = zstandard.ZstdCompressor(level=self._level)
        return c

    def _dctx(self) -> zstandard.ZstdDecompressor:
        d: zstandard.ZstdDecompressor | None = getattr(self._local, "dctx", None)
        if d is None:
            d = self._local.dctx = zstandard.ZstdDecompressor()
        return d

    def _aead(self) -> AESGCM:
        assert self._key is not None
        a: AESGCM | None = getattr(self._local, "aead", None)
        if a is None:
            a = self._local.aead = AESGCM(self._key.cipher_key)
        return a

    def digest(self, data: BytesLike) -> bytes:
        """The chunk's name: SHA-256, or HMAC-SHA256 with the id key when encrypted."""
        if self._key is None:
            return hashlib.sha256(data).digest()
        return hmac.digest(self._key.id_key, data, "sha256")

    def encode(self, data: BytesLike) -> bytes:
        """The blob for ``data``: compressed if that shrinks it, encrypted if keyed."""
        size = len(data)
        if size > MAX_CHUNK_SIZE:
            raise ValueError(f"a blob holds at most {MAX_CHUNK_SIZE} bytes, got {size}")
        flags = 0
        payload: BytesLike = data
        compressed = self._cctx().compress(data)
        if len(compressed) < size:
            flags |= BLOB_FLAG_COMPRESSED
            payload = compressed
        if self._key is None:
            return _HDR.pack(BLOB_MAGIC, flags, 0, 0, size, _NO_NONCE, 0) + payload
        flags |= BLOB_FLAG_ENCRYPTED
        nonce = secrets.token_bytes(BLOB_NONCE_SIZE)
        header = _HDR.pack(BLOB_MAGIC, flags, 0, 0, size, nonce, 0)
        return header + self._aead().encrypt(nonce, bytes(payload), header)

    def prepare(self, data: BytesLike) -> PreparedChunk:
        """Digest and blob of ``data`` (no blob for a zero chunk). CPU only."""
        if is_zero(data):
            return PreparedChunk(ZERO_DIGEST, None, len(data))
        return PreparedChunk(self.digest(data), self.encode(data), len(data))

    def decode(self, blob: BytesLike, *, name: str = "blob") -> bytes:
        """The plaintext of ``blob``; header, tag and zstd frame are checked.

        ``name`` goes into the ``CorruptChunkError`` message. The digest is not
        checked here (snapshot files are checked against their manifest instead);
        ``decode_chunk`` checks it.
        """

        def bad(reason: str) -> CorruptChunkError:
            return CorruptChunkError(f"{name}: {reason}")

        view = memoryview(blob)
        if len(view) < _HDR.size:
            raise bad("shorter than a blob header")
        header = bytes(view[: _HDR.size])
        magic, flags, r1, r2, size, nonce, r3 = _HDR.unpack(header)
        if magic != BLOB_MAGIC:
            raise bad("bad blob magic")
        if flags & ~BLOB_FLAGS_KNOWN or r1 or r2 or r3:
            raise bad("unknown flags or reserved bits set in blob header")
        if size > MAX_CHUNK_SIZE:
            raise bad(f"declared size {size} exceeds the maximum")
        encrypted = bool(flags & BLOB_FLAG_ENCRYPTED)
        if encrypted != self.encrypted:
            state = "encrypted" if encrypted else "unencrypted"
            raise bad(f"{state} blob in a store that is {'not ' if encrypted else ''}encrypted")
        body = view[_HDR.size :]
        if encrypted:
            if len(body) < BLOB_TAG_SIZE:
                raise bad("shorter than an authentication tag")
            try:
                payload: BytesLike = self._aead().decrypt(nonce, bytes(body), header)
            except InvalidTag as exc:
                raise bad("authentication failed (damaged or forged)") from exc
        else:
            if nonce != _NO_NONCE:
                raise bad("nonce set in an unencrypted blob")
            payload = body
        if flags & BLOB_FLAG_COMPRESSED:
            try:
                declared = zstandard.frame_content_size(payload)
                if declared != size:
                    raise bad("zstd frame size does not match the header")
                plain = self._dctx().decompress(payload, max_output_size=size)
            except zstandard.ZstdError as exc:
                raise bad(f"zstd: {exc}") from exc
        else:
            plain = bytes(payload)
        if len(plain) != size:
            raise bad(f"plaintext has {len(plain)} bytes, header says {size}")
        return plain

    def decode_chunk(self, blob: BytesLike, digest: bytes) -> bytes:
        """The verified plaintext of the chunk ``digest``: ``decode`` plus digest check."""
        name = f"chunk {digest.hex()}"
        plain = self.decode(blob, name=name)
        if not hmac.compare_digest(self.digest(plain), digest):
            raise CorruptChunkError(f"{name}: content does not match its digest")
        return plain
