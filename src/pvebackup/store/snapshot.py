"""Snapshots: one key prefix per backup, made visible by its manifest.

A snapshot of guest ``vm``/``ct`` ``<vmid>`` taken at ``<time>`` (UTC, seconds)
lives under ``snapshots/<kind>/<vmid>/<YYYY-MM-DDTHH:MM:SSZ>/``: one ``<device>.fidx``
per disk, further files (guest config, firewall config, task log) as blobs
(compressed, and encrypted in an encrypted store), and ``manifest.json`` last.
Its volume name is ``backup/<kind>-<vmid>-<time>`` (``SnapshotId.volname``).

The manifest lists every file with size and SHA-256 of the stored bytes and holds
the metadata (guest, time, devices and sizes, chunk size, bitmap id, parent). It is
canonical JSON (sorted keys, no spaces, ASCII) plus ``"checksum"``: ``sha256:<hex>``
of the canonical JSON without that field, or in an encrypted store
``hmac-sha256:<hex>`` under the signing key. A reader insists on the exact
canonical bytes, so any flipped bit is found.

Write order (``SnapshotWriter``): chunks (by the caller, through the datastore,
into packs), then indexes and files, then the datastore's ``flush`` (the open pack,
then the index object naming the session's packs, each durable), ``backend.sync()``,
then the manifest (durable, no-overwrite), then ``sync()`` again. Without a
manifest a snapshot does not exist: listing ignores such prefixes and
``Datastore.cleanup_incomplete`` removes them.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Final

import zstandard

from pvebackup.api.errors import (
    CorruptChunkError,
    CorruptIndexError,
    MissingKeyError,
    ObjectNotFoundError,
    SnapshotExistsError,
    UnsupportedError,
    WrongKeyError,
)
from pvebackup.api.types import GuestType
from pvebackup.kit.annotations import SIDECAR_NAMES
from pvebackup.kit.volname import (
    GUEST_OF,
    KIND_OF,
    MAX_TIME,
    TIME_PATTERN,
    VMID_PATTERN,
    BackupVolname,
    format_time,
    parse_time,
)
from pvebackup.store.backends.base import Backend
from pvebackup.store.blob import ChunkCodec
from pvebackup.store.dynindex import (
    MAX_STREAM_SIZE,
    DynamicIndex,
    DynamicIndexWriter,
    max_dynamic_index_size,
)
from pvebackup.store.formats import (
    BLOB_HEADER,
    BLOB_TAG_SIZE,
    FORMAT_VERSION,
    MANIFEST_FORMAT,
    MAX_CHUNK_SIZE,
    MAX_INDEX_CHUNKS,
    MAX_MANIFEST_SIZE,
)
from pvebackup.store.index import (
    FixedIndex,
    FixedIndexWriter,
    check_chunk_size,
    check_image_size,
    index_size,
)
from pvebackup.store.keys import EncryptionKey

__all__ = [
    "MANIFEST_NAME",
    "SNAPSHOTS_PREFIX",
    "FileEntry",
    "Manifest",
    "Snapshot",
    "SnapshotDevice",
    "SnapshotId",
    "SnapshotWriter",
]

SNAPSHOTS_PREFIX: Final = "snapshots/"
MANIFEST_NAME: Final = "manifest.json"
INDEX_SUFFIX: Final = ".fidx"
DYNAMIC_INDEX_SUFFIX: Final = ".didx"
_MAX_INDEXED: Final = (MAX_INDEX_CHUNKS * MAX_CHUNK_SIZE, MAX_CHUNK_SIZE)

_KINDS: Final = KIND_OF
_GUEST_OF_KIND: Final = GUEST_OF
_PATH_RE: Final = re.compile(rf"(vm|ct)/({VMID_PATTERN})/({TIME_PATTERN})", re.ASCII)
_NAME_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,127}")
_SHA256_RE: Final = re.compile(r"[0-9a-f]{64}")
_FINGERPRINT_RE: Final = re.compile(r"[0-9a-f]{2}(?::[0-9a-f]{2}){7}")
_FILE_KINDS: Final = frozenset({"index", "blob"})
_MAX_TIME: Final = MAX_TIME
MAX_BLOB_FILE_SIZE: Final = BLOB_HEADER.size + MAX_CHUNK_SIZE + BLOB_TAG_SIZE
"""Largest stored blob file (config, log): one blob holds at most one chunk."""


def _zstd_bound(size: int) -> int:
    """ZSTD_COMPRESSBOUND: the most a zstd frame of ``size`` bytes of input takes."""
    return size + (size >> 8) + (((128 << 10) - size) >> 11 if size < (128 << 10) else 0) + 64


_MAX_INDEX_FILE: Final = _zstd_bound(
    max(index_size(*_MAX_INDEXED), max_dynamic_index_size(MAX_STREAM_SIZE))
)


# The time format and the volume name scheme are shared with backup-dir.
_format_time = format_time
_parse_time = parse_time


def _check_name(name: str, what: str) -> str:
    # The sidecars' names (notes, protection, verify state) are no snapshot file's:
    # setting notes must never replace a signed file.
    if not _NAME_RE.fullmatch(name) or name == MANIFEST_NAME or name in SIDECAR_NAMES:
        raise ValueError(f"invalid {what} name {name!r}")
    return name


@dataclass(frozen=True, order=True, slots=True)
class SnapshotId:
    """Names one snapshot: guest type, vmid and backup time (UTC epoch seconds)."""

    guest_type: GuestType
    vmid: int
    backup_time: int

    def __post_init__(self) -> None:
        if self.guest_type not in _KINDS or not 0 < self.vmid < 10**9:
            raise ValueError(f"invalid snapshot guest {self.guest_type}/{self.vmid}")
        if not 0 <= self.backup_time <= _MAX_TIME:
            raise ValueError(f"backup time {self.backup_time} out of range")

    @property
    def kind(self) -> str:
        """``vm`` or ``ct``."""
        return _KINDS[self.guest_type]

    @property
    def time_str(self) -> str:
        return _format_time(self.backup_time)

    @property
    def path(self) -> str:
        """``vm/100/2026-11-26T09:30:00Z``."""
        return f"{self.kind}/{self.vmid}/{self.time_str}"

    @property
    def volname(self) -> str:
        """``backup/vm-100-2026-11-26T09:30:00Z``: the volume name PVE sees
        (:mod:`pvebackup.kit.volname`, the scheme both providers use)."""
        return str(BackupVolname(self.guest_type, self.vmid, self.backup_time))

    @property
    def prefix(self) -> str:
        """Backend key prefix of the snapshot's files (ends with ``/``)."""
        return f"{SNAPSHOTS_PREFIX}{self.path}/"

    def __str__(self) -> str:
        return self.path

    @classmethod
    def _from_match(cls, m: re.Match[str] | None, text: str) -> SnapshotId:
        if m is None:
            raise ValueError(f"not a snapshot name: {text!r}")
        return cls(_GUEST_OF_KIND[m.group(1)], int(m.group(2)), _parse_time(m.group(3)))

    @classmethod
    def parse(cls, path: str) -> SnapshotId:
        """Inverse of ``path``; ``ValueError`` if malformed."""
        return cls._from_match(_PATH_RE.fullmatch(path), path)

    @classmethod
    def from_volname(cls, volname: str) -> SnapshotId:
        """Inverse of ``volname``; ``ValueError`` if malformed."""
        name = BackupVolname.parse(volname)
        return cls(name.guest_type, name.vmid, name.backup_time)


@dataclass(frozen=True, slots=True)
class FileEntry:
    """One stored file of a snapshot: ``kind`` is ``index`` or ``blob``."""

    size: int
    sha256: str
    kind: str


@dataclass(frozen=True, slots=True)
class SnapshotDevice:
    """A disk of the snapshot: its size in bytes and its index file's name."""

    size: int
    index: str


@dataclass(frozen=True)
class Manifest:
    """The contents of ``manifest.json`` (see the module docstring)."""

    snapshot: SnapshotId
    created: int
    encrypted: bool
    key_fingerprint: str | None
    chunk_size: int
    devices: Mapping[str, SnapshotDevice]
    files: Mapping[str, FileEntry]
    bitmap_id: str | None = None
    parent: SnapshotId | None = None
    metadata: Mapping[str, str] = field(default_factory=dict)

    def _body(self) -> dict[str, Any]:
        return {
            "format": MANIFEST_FORMAT,
            "version": FORMAT_VERSION,
            "snapshot": self.snapshot.path,
            "created": self.created,
            "encrypted": self.encrypted,
            "key_fingerprint": self.key_fingerprint,
            "chunk_size": self.chunk_size,
            "bitmap_id": self.bitmap_id,
            "parent": None if self.parent is None else self.parent.path,
            "devices": {k: {"size": d.size, "index": d.index} for k, d in self.devices.items()},
            "files": {
                k: {"size": f.size, "sha256": f.sha256, "kind": f.kind}
                for k, f in self.files.items()
            },
            "metadata": dict(self.metadata),
        }

    def to_bytes(self, key: EncryptionKey | None) -> bytes:
        """Canonical JSON with checksum (signed with ``key`` when encrypted)."""
        if self.encrypted != (key is not None):
            raise ValueError("an encrypted manifest needs the key, a plain one none")
        body = self._body()
        body["checksum"] = _checksum(_canonical(body), key)
        return _canonical(body) + b"\n"

    @classmethod
    def from_bytes(
        cls, data: bytes, key: EncryptionKey | None, *, name: str, unsigned_ok: bool = False
    ) -> Manifest:
        """Parse and verify. ``key`` is the store's key (None for a plain store).

        ``CorruptIndexError``: malformed, checksum or signature mismatch, or an
        unsigned manifest in an encrypted store. ``MissingKeyError``: encrypted, no
        key. ``WrongKeyError``: signed by a key with another fingerprint.

        ``unsigned_ok`` (listing an encrypted store without its key, only): an
        encrypted manifest is parsed without checking its signature, which needs
        the key. Every field is still checked as in a plain store (the checksum of
        which authenticates nothing either); nothing read so may be trusted beyond
        showing it: whoever can write the storage can forge such a listing.
        """

        def bad(reason: str) -> CorruptIndexError:
            return CorruptIndexError(f"{name}: {reason}")

        if len(data) > MAX_MANIFEST_SIZE:
            raise bad(f"{len(data)} bytes, more than a manifest may have")
        try:
            doc = json.loads(data)
        except (ValueError, RecursionError) as exc:  # nesting bombs are RecursionError
            raise bad("not valid JSON") from exc
        if not isinstance(doc, dict) or doc.get("format") != MANIFEST_FORMAT:
            raise bad("not a manifest")
        if doc.get("version") != FORMAT_VERSION:
            raise bad(f"unsupported manifest version {doc.get('version')!r}")
        if _canonical(doc) + b"\n" != data:
            raise bad("not in canonical form (damaged)")
        stored = doc.pop("checksum", None)
        encrypted = doc.get("encrypted")
        if encrypted is True:
            if key is None and unsigned_ok:
                if not isinstance(stored, str) or not stored.startswith("hmac-sha256:"):
                    raise bad("encrypted manifest without a signature")
                try:
                    return cls._from_doc(doc)
                except (KeyError, TypeError, ValueError, AttributeError) as exc:
                    raise bad(f"malformed field: {exc}") from exc
            if key is None:
                raise MissingKeyError(f"{name}: the snapshot is encrypted; no key given")
        elif key is not None:
            raise bad("unsigned manifest in an encrypted store")
        if not isinstance(stored, str) or not hmac.compare_digest(
            stored, _checksum(_canonical(doc), key)
        ):
            if key is not None and doc.get("key_fingerprint") != key.fingerprint:
                raise WrongKeyError(
                    f"{name}: signed with key {doc.get('key_fingerprint')!r}, "
                    f"not with the given key {key.fingerprint}"
                )
            raise bad("checksum or signature mismatch")
        try:
            return cls._from_doc(doc)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise bad(f"malformed field: {exc}") from exc

    @classmethod
    def _from_doc(cls, doc: dict[str, Any]) -> Manifest:
        # Field by field: a plain store's checksum is no authentication, so every
        # type, range and name is checked before anything is sized or opened by it
        # (a list for a dict, a string for an int, NaN, 10**400, -1, "../x").
        def typed(value: Any, t: type | tuple[type, ...]) -> Any:
            if not isinstance(value, t) or (t is int and isinstance(value, bool)):
                raise TypeError(f"{value!r:.80} is not {t}")
            return value

        def ranged(value: Any, lo: int, hi: int, what: str) -> int:
            if not lo <= typed(value, int) <= hi:
                raise ValueError(f"{what} {value} out of range")
            return int(value)

        def matching(value: Any, pattern: re.Pattern[str], what: str) -> str:
            if not pattern.fullmatch(typed(value, str)):
                raise ValueError(f"bad {what} {value!r:.80}")
            return str(value)

        chunk_size = check_chunk_size(typed(doc["chunk_size"], int))
        devices: dict[str, SnapshotDevice] = {}
        for k, v in typed(doc["devices"], dict).items():
            size = typed(typed(v, dict)["size"], int)
            index = _check_name(typed(v["index"], str), "index")
            # The suffix says the index kind (a container archive's stream has a
            # dynamic one); each kind bounds the size it may claim.
            if index == _check_name(k, "device") + DYNAMIC_INDEX_SUFFIX:
                ranged(size, 0, MAX_STREAM_SIZE, "stream size")
            elif index == k + INDEX_SUFFIX:
                check_image_size(size, chunk_size)
            else:
                raise ValueError(f"device {k!r} has index {index!r}")
            devices[k] = SnapshotDevice(size, index)
        files: dict[str, FileEntry] = {}
        for k, v in typed(doc["files"], dict).items():
            kind = typed(typed(v, dict)["kind"], str)
            if kind not in _FILE_KINDS:
                raise ValueError(f"file {k!r} of unknown kind {kind!r:.20}")
            limit = _MAX_INDEX_FILE if kind == "index" else MAX_BLOB_FILE_SIZE
            files[_check_name(k, "file")] = FileEntry(
                ranged(v["size"], 0, limit, "file size"),
                matching(v["sha256"], _SHA256_RE, "sha256"),
                kind,
            )
        fingerprint = doc["key_fingerprint"]
        parent = doc["parent"]
        meta = typed(doc["metadata"], dict)
        return cls(
            snapshot=SnapshotId.parse(typed(doc["snapshot"], str)),
            created=ranged(doc["created"], 0, 1 << 62, "created"),
            encrypted=typed(doc["encrypted"], bool),
            key_fingerprint=None
            if typed(fingerprint, (str, type(None))) is None
            else matching(fingerprint, _FINGERPRINT_RE, "key fingerprint"),
            chunk_size=chunk_size,
            bitmap_id=typed(doc["bitmap_id"], (str, type(None))),
            parent=None if parent is None else SnapshotId.parse(typed(parent, str)),
            devices=devices,
            files=files,
            metadata={typed(k, str): typed(v, str) for k, v in meta.items()},
        )


def _canonical(doc: Mapping[str, Any]) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _checksum(body: bytes, key: EncryptionKey | None) -> str:
    if key is None:
        return "sha256:" + hashlib.sha256(body).hexdigest()
    return "hmac-sha256:" + hmac.digest(key.signing_key, body, "sha256").hex()


class SnapshotWriter:
    """Writes one snapshot; the manifest goes last, on ``commit()`` or a clean exit.

    Made by ``Datastore.new_snapshot``. Store the chunks through the datastore
    first, then add indexes (``index_writer``/``add_index``) and files
    (``add_file``). Leaving the ``with`` block by an exception deletes what was
    written (no manifest, so nothing became visible anyway).
    """

    def __init__(
        self,
        backend: Backend,
        codec: ChunkCodec,
        key: EncryptionKey | None,
        snapshot: SnapshotId,
        *,
        chunk_size: int,
        bitmap_id: str | None = None,
        parent: SnapshotId | None = None,
        flush: Callable[[], None] | None = None,
    ) -> None:
        self._backend = backend
        self._flush = flush
        self._codec = codec
        self._key = key
        self.snapshot = snapshot
        self.chunk_size = check_chunk_size(chunk_size)
        self.bitmap_id = bitmap_id
        self.parent = parent
        self.metadata: dict[str, str] = {}
        self._devices: dict[str, SnapshotDevice] = {}
        self._files: dict[str, FileEntry] = {}
        self.manifest: Manifest | None = None
        self.manifest_sha256: str | None = None
        """SHA-256 (hex) of the stored manifest bytes, once committed."""
        if backend.exists(snapshot.prefix + MANIFEST_NAME):
            raise SnapshotExistsError(f"snapshot {snapshot} exists already")

    def _put(self, name: str, data: bytes, kind: str) -> None:
        if self.manifest is not None:
            raise RuntimeError("the snapshot is committed already")
        if name in self._files:
            raise ValueError(f"file {name!r} added twice")
        self._backend.put(self.snapshot.prefix + name, data, overwrite=True, durable=False)
        self._files[name] = FileEntry(len(data), hashlib.sha256(data).hexdigest(), kind)

    def add_index(self, device: str, index: bytes) -> None:
        """Store the encoded fixed index of disk ``device`` (zstd-compressed)."""
        parsed = FixedIndex(index, name=f"{self.snapshot} {device}")
        if parsed.chunk_size != self.chunk_size:
            raise ValueError(f"index chunk size {parsed.chunk_size} != {self.chunk_size}")
        name = _check_name(device, "device") + INDEX_SUFFIX
        # Zero chunks are runs of zero digests: a sparse 1 TiB disk's 128 MiB index
        # shrinks to a few KiB, so a snapshot's cost follows the data, not the disk.
        self._put(name, zstandard.ZstdCompressor(level=3).compress(index), "index")
        self._devices[device] = SnapshotDevice(parsed.size, name)

    def index_writer(self, device: str, size: int) -> FixedIndexWriter:
        """A new all-zero index for ``device``, stored when its ``with`` block ends.

        :raises UnsupportedError: the disk needs more than ``MAX_INDEX_CHUNKS``
            chunks of the snapshot's chunk size (a reader would refuse the index).
        """
        _check_name(device, "device")
        try:
            check_image_size(size, self.chunk_size)
        except ValueError as exc:
            raise UnsupportedError(
                f"{device}: a disk of {size} bytes needs more than {MAX_INDEX_CHUNKS} chunks "
                f"of {self.chunk_size} bytes; set a larger chunk-size for this storage"
            ) from exc
        return FixedIndexWriter(
            size, self.chunk_size, on_commit=lambda data: self.add_index(device, data)
        )

    def add_dynamic_index(self, device: str, index: bytes) -> None:
        """Store the encoded dynamic index of stream ``device`` (zstd-compressed)."""
        parsed = DynamicIndex(index, name=f"{self.snapshot} {device}")
        name = _check_name(device, "device") + DYNAMIC_INDEX_SUFFIX
        self._put(name, zstandard.ZstdCompressor(level=3).compress(index), "index")
        self._devices[device] = SnapshotDevice(parsed.size, name)

    def dynamic_index_writer(self, device: str) -> DynamicIndexWriter:
        """A new dynamic index for stream ``device``, stored when its block ends."""
        _check_name(device, "device")
        return DynamicIndexWriter(on_commit=lambda data: self.add_dynamic_index(device, data))

    def index_writer_from(self, device: str, previous: FixedIndex) -> FixedIndexWriter:
        """An index for ``device`` starting from ``previous`` (incremental backup)."""
        _check_name(device, "device")
        return FixedIndexWriter.from_index(
            previous, on_commit=lambda data: self.add_index(device, data)
        )

    def add_file(self, name: str, data: bytes) -> None:
        """Store a small file (config, log) as a blob; at most 16 MiB."""
        self._put(_check_name(name, "file"), self._codec.encode(data), "blob")

    def commit(self) -> Manifest:
        """Make the snapshot durable and visible. Returns its manifest."""
        if self.manifest is not None:
            return self.manifest
        manifest = Manifest(
            snapshot=self.snapshot,
            created=int(time.time()),
            encrypted=self._key is not None,
            key_fingerprint=None if self._key is None else self._key.fingerprint,
            chunk_size=self.chunk_size,
            devices=dict(self._devices),
            files=dict(self._files),
            bitmap_id=self.bitmap_id,
            parent=self.parent,
            metadata=dict(self.metadata),
        )
        if self._flush is not None:
            self._flush()  # the open pack, then the index object naming the new packs
        self._backend.sync()  # packs, index objects and files before the manifest
        data = manifest.to_bytes(self._key)
        if not self._backend.put(self.snapshot.prefix + MANIFEST_NAME, data, overwrite=False):
            raise SnapshotExistsError(f"snapshot {self.snapshot} was committed by someone else")
        self._backend.sync()
        self.manifest = manifest
        self.manifest_sha256 = hashlib.sha256(data).hexdigest()
        return manifest

    def abort(self) -> None:
        """Delete what this writer stored (it never had a manifest)."""
        if self.manifest is not None:
            return
        for name in self._files:
            self._backend.delete(self.snapshot.prefix + name)
        self._files.clear()
        self._devices.clear()

    def __enter__(self) -> SnapshotWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


class Snapshot:
    """A committed snapshot: its verified manifest and verified reads of its files."""

    def __init__(
        self,
        backend: Backend,
        codec: ChunkCodec,
        manifest: Manifest,
        manifest_sha256: str | None = None,
    ) -> None:
        self._backend = backend
        self._codec = codec
        self.manifest = manifest
        self.id = manifest.snapshot
        self.manifest_sha256 = manifest_sha256
        """SHA-256 (hex) of the manifest bytes as read from the store."""

    def __repr__(self) -> str:
        return f"Snapshot({self.id})"

    @property
    def devices(self) -> Mapping[str, SnapshotDevice]:
        return self.manifest.devices

    def file_names(self) -> list[str]:
        """Names of the non-index files (configs, logs)."""
        return sorted(k for k, f in self.manifest.files.items() if f.kind == "blob")

    def _read(self, name: str, kind: str) -> bytes:
        entry = self.manifest.files.get(name)
        if entry is None or entry.kind != kind:
            raise ObjectNotFoundError(f"snapshot {self.id} has no {kind} {name!r}")
        key = self.id.prefix + name
        try:
            # A stored file swapped for a huge one must not be read whole just to
            # find out that it does not match: its size is checked first.
            if self._backend.stat(key).size != entry.size:
                raise CorruptIndexError(f"snapshot {self.id}: {name} does not match the manifest")
            data = self._backend.get(key)
        except ObjectNotFoundError as exc:
            raise CorruptIndexError(f"snapshot {self.id}: {name} listed but missing") from exc
        if len(data) != entry.size or hashlib.sha256(data).hexdigest() != entry.sha256:
            raise CorruptIndexError(f"snapshot {self.id}: {name} does not match the manifest")
        return data

    def read_file(self, name: str) -> bytes:
        """The verified contents of file ``name`` (``ObjectNotFoundError`` if unlisted)."""
        data = self._read(name, "blob")
        try:
            return self._codec.decode(data, name=f"snapshot {self.id} {name}")
        except CorruptChunkError as exc:
            raise CorruptIndexError(str(exc)) from exc

    def open_index(self, device: str) -> FixedIndex | DynamicIndex:
        """The verified index of ``device``: fixed for disks, dynamic for streams."""
        dev = self.manifest.devices.get(device)
        if dev is None:
            raise ObjectNotFoundError(f"snapshot {self.id} has no device {device!r}")
        if dev.index.endswith(DYNAMIC_INDEX_SUFFIX):
            return self._open_dynamic(device, dev)
        return self.open_fixed_index(device)

    def _open_dynamic(self, device: str, dev: SnapshotDevice) -> DynamicIndex:
        name = f"snapshot {self.id} {device}"
        # Bounded inflation as for fixed indexes, but the entry count is not fixed
        # by the size: at most one entry per byte, at most MAX_INDEX_CHUNKS.
        limit = max_dynamic_index_size(dev.size)
        entry = self.manifest.files.get(dev.index)
        if entry is not None and entry.size > _zstd_bound(limit):
            raise CorruptIndexError(f"{name}: stored index larger than its content could be")
        compressed = self._read(dev.index, "index")
        try:
            declared = zstandard.frame_content_size(compressed)
            if not 0 <= declared <= limit:
                raise CorruptIndexError(f"{name}: index frame declares {declared} bytes")
            data = zstandard.ZstdDecompressor().decompress(compressed, max_output_size=limit)
        except zstandard.ZstdError as exc:
            raise CorruptIndexError(f"{name}: index does not decompress: {exc}") from exc
        index = DynamicIndex(data, name=name)
        if index.size != dev.size:
            raise CorruptIndexError(f"{name}: index disagrees with manifest")
        return index

    def open_fixed_index(self, device: str) -> FixedIndex:
        """The verified fixed index of disk ``device``."""
        dev = self.manifest.devices.get(device)
        if dev is None:
            raise ObjectNotFoundError(f"snapshot {self.id} has no device {device!r}")
        if not dev.index.endswith(INDEX_SUFFIX):
            raise CorruptIndexError(f"snapshot {self.id} {device} is a stream, not a disk")
        name = f"snapshot {self.id} {device}"
        # Bounded inflation: the manifest's disk size (itself capped at parse time by
        # MAX_INDEX_CHUNKS) fixes the index size exactly. zstd allocates what the
        # frame header declares and ignores max_output_size then, so the declared
        # size is checked first, and a frame without one is refused.
        expected = index_size(dev.size, self.manifest.chunk_size)
        entry = self.manifest.files.get(dev.index)
        if entry is not None and entry.size > _zstd_bound(expected):
            raise CorruptIndexError(f"{name}: stored index larger than its content could be")
        compressed = self._read(dev.index, "index")
        try:
            declared = zstandard.frame_content_size(compressed)
            if declared != expected:
                raise CorruptIndexError(
                    f"{name}: index frame declares {declared} bytes, the manifest {expected}"
                )
            data = zstandard.ZstdDecompressor().decompress(compressed, max_output_size=expected)
        except zstandard.ZstdError as exc:
            raise CorruptIndexError(f"{name}: index does not decompress: {exc}") from exc
        index = FixedIndex(data, name=name)
        if index.size != dev.size or index.chunk_size != self.manifest.chunk_size:
            raise CorruptIndexError(f"snapshot {self.id} {device}: index disagrees with manifest")
        return index

    def keys(self) -> Iterator[str]:
        """Backend keys of every listed file (for verification and removal)."""
        for name in self.manifest.files:
            yield self.id.prefix + name
