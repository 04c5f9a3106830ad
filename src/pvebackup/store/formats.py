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
    "DYNAMIC_INDEX_MAGIC",
    "DYNAMIC_INDEX_HEADER",
    "DYNAMIC_INDEX_ENTRY",
    "FORMAT_VERSION",
    "GC_RECORD_ENTRY",
    "GC_RECORD_HEADER",
    "GC_RECORD_MAGIC",
    "KDF_SALT",
    "MAX_GC_RECORD_ENTRIES",
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
    "CHUNK_INDEX_ENTRY",
    "CHUNK_INDEX_HEADER",
    "CHUNK_INDEX_MAGIC",
    "MAX_CHUNK_INDEX_ENTRIES",
    "MAX_PACK_ENTRIES",
    "MAX_PACK_SIZE",
    "PACK_DESCRIPTION_HEADER",
    "PACK_DESCRIPTION_MAGIC",
    "PACK_ENTRY",
    "PACK_HEADER",
    "PACK_MAGIC",
    "PACK_TRAILER",
    "STORE_FORMAT_IDS",
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

FORMAT_VERSION: Final = 2
"""Store format 2: chunks in packs, a chunk index (format 1, chunk files, is refused)."""
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

# --- dynamic index ---------------------------------------------------------------
# A stream (a container archive) cut at content-defined boundaries: header, then
# one DYNAMIC_INDEX_ENTRY per chunk (the chunk's end offset in the stream, then its
# digest), ends strictly increasing, the last one equal to ``size``.

# sha256(b"pvebackup dynamic index v1")[:8]
DYNAMIC_INDEX_MAGIC: Final = bytes.fromhex("d7e2cb7076e971c2")
assert derive_magic("dynamic index v1") == DYNAMIC_INDEX_MAGIC

DYNAMIC_INDEX_HEADER: Final = Layout(
    "dynamic index header",
    (
        Field("magic", "8s"),
        Field("uuid", "16s"),
        Field("ctime", "q"),  # seconds since the epoch, UTC
        Field("size", "Q"),  # stream size in bytes
        Field("count", "Q"),  # number of entries
        Field("flags", "I"),  # none defined yet: must be 0
        # sha256 over the header with this field zeroed, then all entries
        Field("checksum", "32s"),
        Field("reserved", "428s"),
    ),
    512,
)

DYNAMIC_INDEX_ENTRY: Final = Layout(
    "dynamic index entry",
    (
        Field("end", "Q"),  # offset just past the chunk in the stream
        Field("digest", "32s"),
    ),
    40,
)

# --- pack ------------------------------------------------------------------------
# PACK_HEADER, the chunk blobs back to back, the description (one blob, encrypted
# in an encrypted store), PACK_TRAILER. Named by the SHA-256 of all its bytes.

# sha256(b"pvebackup pack v1")[:8] = 01 8c 5a 32 c2 6f 30 43
PACK_MAGIC: Final = bytes.fromhex("018c5a32c26f3043")
assert derive_magic("pack v1") == PACK_MAGIC

PACK_HEADER: Final = Layout(
    "pack header",
    (
        Field("magic", "8s"),
        Field("reserved", "8s"),
    ),
    16,
)

PACK_TRAILER: Final = Layout(
    "pack trailer",
    (
        Field("magic", "8s"),
        Field("description_size", "I"),  # stored size of the description blob
        Field("reserved", "I"),
    ),
    16,
)

# sha256(b"pvebackup pack description v1")[:8] = a2 cc 70 46 00 be c6 fb
PACK_DESCRIPTION_MAGIC: Final = bytes.fromhex("a2cc704600bec6fb")
assert derive_magic("pack description v1") == PACK_DESCRIPTION_MAGIC

PACK_DESCRIPTION_HEADER: Final = Layout(
    "pack description header",
    (
        Field("magic", "8s"),
        Field("count", "I"),  # entries that follow
        Field("reserved", "I"),
    ),
    16,
)

PACK_ENTRY: Final = Layout(
    "pack entry",
    (
        Field("digest", "32s"),
        Field("offset", "I"),  # of the chunk's blob in the pack
        Field("length", "I"),  # stored size of the blob
        Field("size", "I"),  # plaintext size
        Field("flags", "I"),  # the blob's flags (compression, encryption)
    ),
    48,
)

MAX_PACK_SIZE: Final = 1 << 30
"""Largest pack a reader accepts (the target is a few MiB; u32 offsets fit)."""
MAX_PACK_ENTRIES: Final = (MAX_CHUNK_SIZE - PACK_DESCRIPTION_HEADER.size) // PACK_ENTRY.size
"""A description is one blob (at most MAX_CHUNK_SIZE of plaintext)."""

# --- chunk index object -------------------------------------------------------------
# ``index/<sha256 of the stored bytes>``: one blob whose plaintext is the header,
# ``pack_count`` pack names (32 bytes each), then ``entry_count`` entries.

# sha256(b"pvebackup chunk index v1")[:8] = 8e f5 1b ea b6 24 a8 cd
CHUNK_INDEX_MAGIC: Final = bytes.fromhex("8ef51beab624a8cd")
assert derive_magic("chunk index v1") == CHUNK_INDEX_MAGIC

CHUNK_INDEX_HEADER: Final = Layout(
    "chunk index header",
    (
        Field("magic", "8s"),
        Field("session", "16s"),  # random id of the writer session
        Field("created", "q"),  # seconds since the epoch
        Field("pack_count", "I"),
        Field("entry_count", "I"),
    ),
    40,
)

CHUNK_INDEX_ENTRY: Final = Layout(
    "chunk index entry",
    (
        Field("digest", "32s"),
        Field("pack", "I"),  # number of the pack in this object's pack list
        Field("offset", "I"),
        Field("length", "I"),
        Field("size", "I"),
    ),
    48,
)

MAX_CHUNK_INDEX_ENTRIES: Final = (
    MAX_CHUNK_SIZE - CHUNK_INDEX_HEADER.size - DIGEST_SIZE
) // (CHUNK_INDEX_ENTRY.size + DIGEST_SIZE)
"""Entries one index object may hold (one pack per entry at worst): it is one blob."""

# --- garbage collection record ----------------------------------------------------------
# ``gc/condemned/<hex>``: one blob whose plaintext is the header, then ``count``
# entries: a condemned chunk location, or (zero digest, pack) for a pack that no
# index object named.

# sha256(b"pvebackup gc record v1")[:8]
GC_RECORD_MAGIC: Final = bytes.fromhex("a6ac9f6e3fe4e3ce")
assert derive_magic("gc record v1") == GC_RECORD_MAGIC

GC_RECORD_HEADER: Final = Layout(
    "gc record header",
    (
        Field("magic", "8s"),
        Field("created", "d"),  # seconds since the epoch (float) of the condemnation
        Field("count", "I"),
        Field("reserved", "I"),
    ),
    24,
)

GC_RECORD_ENTRY: Final = Layout(
    "gc record entry",
    (
        Field("digest", "32s"),  # zero: the whole pack (named by no index object)
        Field("pack", "32s"),
    ),
    64,
)

MAX_GC_RECORD_ENTRIES: Final = (MAX_CHUNK_SIZE - GC_RECORD_HEADER.size) // GC_RECORD_ENTRY.size

STORE_FORMAT_IDS: Final[dict[str, str]] = {
    "digest": "sha256",
    "keyed_digest": "hmac-sha256",
    "compression": "zstd",
    "cipher": "aes-256-gcm",
    "pack": "pack-v1",
    "chunk_index": "chunk-index-v1",
}
"""Algorithm and layout ids recorded in ``config.json``; a reader refuses others."""

MAGICS: Final[dict[str, bytes]] = {
    "BLOB_MAGIC": BLOB_MAGIC,
    "FIXED_INDEX_MAGIC": FIXED_INDEX_MAGIC,
    "DYNAMIC_INDEX_MAGIC": DYNAMIC_INDEX_MAGIC,
    "PACK_MAGIC": PACK_MAGIC,
    "PACK_DESCRIPTION_MAGIC": PACK_DESCRIPTION_MAGIC,
    "CHUNK_INDEX_MAGIC": CHUNK_INDEX_MAGIC,
    "GC_RECORD_MAGIC": GC_RECORD_MAGIC,
}
LAYOUTS: Final[dict[str, Layout]] = {
    "BLOB_HEADER": BLOB_HEADER,
    "FIXED_INDEX_HEADER": FIXED_INDEX_HEADER,
    "DYNAMIC_INDEX_HEADER": DYNAMIC_INDEX_HEADER,
    "DYNAMIC_INDEX_ENTRY": DYNAMIC_INDEX_ENTRY,
    "PACK_HEADER": PACK_HEADER,
    "PACK_TRAILER": PACK_TRAILER,
    "PACK_DESCRIPTION_HEADER": PACK_DESCRIPTION_HEADER,
    "PACK_ENTRY": PACK_ENTRY,
    "CHUNK_INDEX_HEADER": CHUNK_INDEX_HEADER,
    "CHUNK_INDEX_ENTRY": CHUNK_INDEX_ENTRY,
    "GC_RECORD_HEADER": GC_RECORD_HEADER,
    "GC_RECORD_ENTRY": GC_RECORD_ENTRY,
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
