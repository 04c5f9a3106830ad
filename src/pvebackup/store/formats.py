"""Every on-disk layout of the chunk store, in one place.

WARNING: the magics and layouts below are part of the stored data. Never change
an existing one: stores written today must stay readable. A new layout gets a new
magic (bump the ``v1`` in its derivation string) and the reader keeps the old one.

Each magic is the first 8 bytes of ``sha256(b"pvebackup <thing> v1")``; the
literal is written out so that a reader of this file sees it, and the derivation is
asserted at import so that the two cannot drift apart.

``docs/file-formats.md`` shows the same layouts as tables; a test parses that file
and checks that it agrees with this module (magics, field names, offsets, sizes).
All integers are little-endian. Reserved fields must be zero: a reader rejects a
header whose reserved bytes are not, so that a flipped bit anywhere is noticed.

JSON documents (store config, snapshot manifest, key file) are described in
``docs/file-formats.md`` too; their ``format``/``version`` strings are here, and so
are the key-derivation labels (:data:`KEY_LABELS`, a table in that file too).
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass, field
from typing import Final

__all__ = [
    "BLOB_FLAG_COMPRESSED",
    "BLOB_FLAG_ENCRYPTED",
    "BLOB_FLAGS_KNOWN",
    "BLOB_HEADER",
    "BLOB_MAGIC",
    "BLOB_NONCE_SIZE",
    "BLOB_TAG_SIZE",
    "CONFIG_FORMAT",
    "DIGEST_SIZE",
    "FIXED_INDEX_HEADER",
    "FIXED_INDEX_MAGIC",
    "FORMAT_VERSION",
    "KDF_SALT",
    "KEY_FILE_FORMAT",
    "KEY_FILE_WRAP_AAD",
    "KEY_LABELS",
    "LABEL_BITMAP_BASE_RECORD",
    "LABEL_BLOB_CIPHER",
    "LABEL_CHUNK_ID",
    "LABEL_KEY_CHECK",
    "LABEL_KEY_FINGERPRINT",
    "LABEL_MANIFEST_SIGNATURE",
    "LAYOUTS",
    "MAGICS",
    "MANIFEST_FORMAT",
    "MAX_CHUNK_SIZE",
    "MAX_CONFIG_SIZE",
    "MAX_INDEX_CHUNKS",
    "MAX_MANIFEST_SIZE",
    "MIN_CHUNK_SIZE",
    "Field",
    "Layout",
    "ZERO_DIGEST",
    "derive_magic",
]


def derive_magic(label: str) -> bytes:
    """The first 8 bytes of ``sha256(b"pvebackup <label>")``."""
    return hashlib.sha256(f"pvebackup {label}".encode("ascii")).digest()[:8]


@dataclass(frozen=True)
class Field:
    """One field of a binary header: its name and its ``struct`` format code."""

    name: str
    code: str

    @property
    def size(self) -> int:
        return struct.calcsize("<" + self.code)


@dataclass(frozen=True)
class Layout:
    """A fixed binary header: named fields packed little-endian without gaps."""

    name: str
    fields: tuple[Field, ...]
    size: int
    struct: struct.Struct = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        s = struct.Struct("<" + "".join(f.code for f in self.fields))
        # The declared size is the contract; an edit that changes it must fail here.
        assert s.size == self.size, f"{self.name}: {s.size} != {self.size}"
        object.__setattr__(self, "struct", s)

    def offsets(self) -> list[tuple[str, int, int]]:
        """``(name, offset, size)`` of every field, in order."""
        out: list[tuple[str, int, int]] = []
        offset = 0
        for f in self.fields:
            out.append((f.name, offset, f.size))
            offset += f.size
        return out


DIGEST_SIZE: Final = 32
"""Size of a chunk digest (SHA-256 or HMAC-SHA256)."""

ZERO_DIGEST: Final = bytes(DIGEST_SIZE)
"""Index entry of a chunk that holds only zero bytes: such a chunk is never stored.

A real SHA-256/HMAC-SHA256 output of 32 zero bytes has probability 2**-256."""

MIN_CHUNK_SIZE: Final = 64 * 1024
MAX_CHUNK_SIZE: Final = 16 * 1024 * 1024
"""Chunk sizes are powers of two in this range; a blob never holds more plaintext."""

MAX_INDEX_CHUNKS: Final = 1 << 26
"""Most chunks one fixed index may list: 2 GiB of digests, held in memory whole.

That is a 16 TiB disk at the default 256 KiB chunks (1 PiB at 16 MiB). Readers
refuse a manifest or index header claiming more before allocating anything, so a
hostile store cannot make a reader inflate a small file into many GiB; writers
refuse it too, so that nothing is ever written that could not be read back."""

MAX_MANIFEST_SIZE: Final = 16 * 1024 * 1024
"""Largest ``manifest.json`` a reader loads (a real one is a few KiB)."""

MAX_CONFIG_SIZE: Final = 64 * 1024
"""Largest store ``config.json`` a reader loads (a real one is ~400 bytes)."""

FORMAT_VERSION: Final = 1
CONFIG_FORMAT: Final = "pvebackup-store"
MANIFEST_FORMAT: Final = "pvebackup-manifest"
KEY_FILE_FORMAT: Final = "pvebackup-key"

# --- blob ------------------------------------------------------------------------

# sha256(b"pvebackup blob v1")[:8] = 90 da 3e 9f 8e 2f d2 c2
BLOB_MAGIC: Final = bytes.fromhex("90da3e9f8e2fd2c2")
assert derive_magic("blob v1") == BLOB_MAGIC

BLOB_FLAG_COMPRESSED: Final = 0x01
"""The payload is one zstd frame."""
BLOB_FLAG_ENCRYPTED: Final = 0x02
"""The payload is AES-256-GCM ciphertext followed by its 16-byte tag; AAD = header."""
BLOB_FLAGS_KNOWN: Final = BLOB_FLAG_COMPRESSED | BLOB_FLAG_ENCRYPTED
BLOB_NONCE_SIZE: Final = 12
BLOB_TAG_SIZE: Final = 16

BLOB_HEADER: Final = Layout(
    "blob header",
    (
        Field("magic", "8s"),
        Field("flags", "B"),
        Field("reserved1", "B"),
        Field("reserved2", "H"),
        Field("size", "I"),  # plaintext length
        Field("nonce", "12s"),  # zero when not encrypted
        Field("reserved3", "I"),
    ),
    32,
)

# --- fixed index -----------------------------------------------------------------

# sha256(b"pvebackup fixed index v1")[:8] = eb ae 07 34 ce 1f df 52
FIXED_INDEX_MAGIC: Final = bytes.fromhex("ebae0734ce1fdf52")
assert derive_magic("fixed index v1") == FIXED_INDEX_MAGIC

FIXED_INDEX_HEADER: Final = Layout(
    "fixed index header",
    (
        Field("magic", "8s"),
        Field("uuid", "16s"),
        Field("ctime", "q"),  # seconds since the epoch, UTC
        Field("size", "Q"),  # image size in bytes
        Field("chunk_size", "I"),
        Field("flags", "I"),  # none defined yet: must be 0
        # sha256 over the header with this field zeroed, then all digests
        Field("checksum", "32s"),
        Field("reserved", "432s"),
    ),
    512,
)

MAGICS: Final[dict[str, bytes]] = {
    "BLOB_MAGIC": BLOB_MAGIC,
    "FIXED_INDEX_MAGIC": FIXED_INDEX_MAGIC,
}
LAYOUTS: Final[dict[str, Layout]] = {
    "BLOB_HEADER": BLOB_HEADER,
    "FIXED_INDEX_HEADER": FIXED_INDEX_HEADER,
}

# --- key derivation --------------------------------------------------------------
# Changing one of these makes every encrypted store unreadable (other chunk ids,
# other ciphers, other signatures): like the magics, never change one.

KDF_SALT: Final = b"pvebackup key derivation v1"
"""HKDF-SHA256 salt of every key derived from a store's master key."""
LABEL_BLOB_CIPHER: Final = b"pvebackup blob cipher v1"
"""HKDF info of the AES-256-GCM key of blobs."""
LABEL_CHUNK_ID: Final = b"pvebackup chunk id v1"
"""HKDF info of the HMAC-SHA256 key of chunk digests."""
LABEL_MANIFEST_SIGNATURE: Final = b"pvebackup manifest signature v1"
"""HKDF info of the HMAC-SHA256 key of manifest signatures."""
LABEL_KEY_CHECK: Final = b"pvebackup key check v1"
"""HKDF info of the key check stored in the store's config."""
LABEL_KEY_FINGERPRINT: Final = b"pvebackup key fingerprint v1"
"""HKDF info of the fingerprint (first 8 bytes) shown for a key."""
KEY_FILE_WRAP_AAD: Final = b"pvebackup key file v1"
"""Associated data of the AES-256-GCM wrap of a passphrase-protected key file."""
LABEL_BITMAP_BASE_RECORD: Final = b"pvebackup backup-store bitmap-base record v1"
"""HMAC-SHA256 message, under the signing key, giving the key of bitmap-base records."""

KEY_LABELS: Final[dict[str, bytes]] = {
    "KDF_SALT": KDF_SALT,
    "LABEL_BLOB_CIPHER": LABEL_BLOB_CIPHER,
    "LABEL_CHUNK_ID": LABEL_CHUNK_ID,
    "LABEL_MANIFEST_SIGNATURE": LABEL_MANIFEST_SIGNATURE,
    "LABEL_KEY_CHECK": LABEL_KEY_CHECK,
    "LABEL_KEY_FINGERPRINT": LABEL_KEY_FINGERPRINT,
    "KEY_FILE_WRAP_AAD": KEY_FILE_WRAP_AAD,
    "LABEL_BITMAP_BASE_RECORD": LABEL_BITMAP_BASE_RECORD,
}
"""Every key-derivation label by name (``docs/file-formats.md`` lists the same)."""
