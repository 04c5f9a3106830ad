"""A ``backup-store`` storage's properties, and opening its datastore.

::

    backup-store: store1
        path /srv/pvebackup-store       # the datastore directory (local backend)
        encryption-key /etc/pvebackup/store1.key
        encryption-passphrase-file /etc/pvebackup/store1.pass   # only for protected keys
        chunk-size 256K                  # for new indexes; default: the store's
        cache-dir /var/cache/pvebackup/store1   # host caches (default: host state dir)
        ct-restore tar                   # container restore mechanism: tar or directory
        is_mountpoint yes                # usable only while a file system is mounted there
        create-base-path 0               # create path when missing (default no: refused)

    backup-store: s3store               # the same in an S3 bucket (no path)
        s3-endpoint https://s3.eu-central-1.amazonaws.com
        s3-bucket pve-backups
        s3-prefix node1                  # optional: keys under node1/ in the bucket
        s3-region eu-central-1           # default us-east-1 (what RGW accepts)
        s3-path-style 0                  # default 1: http://host/bucket/key
        s3-credentials /etc/pvebackup/s3store.cred   # 0600: access-key = / secret-key =
        s3-max-requests 16               # requests in flight at once (default 8)

Without ``encryption-passphrase-file``, a protected key's passphrase comes from
the file named by ``PVEBACKUP_PASSPHRASE_FILE``, else a prompt on a terminal.
The key and passphrase files must be private to their owner (mode 0600 or
0400): like OpenSSH, we refuse them otherwise (:class:`UnprotectedKeyFileError`).

The backend is chosen in one place (:func:`pvebackup.store.backends.make_backend`):
``local`` with ``path``, ``s3`` with ``s3-bucket`` (the two exclude each other).
The S3 keys live only in the ``s3-credentials`` file (0600, like the key file):
never in storage.cfg, argv (the restore server gets the file's path) or messages.

The key is loaded and checked against the store's config before any data is read or written: an
encrypted store without a key raises :class:`MissingKeyError`, a wrong key
:class:`WrongKeyError`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from pvebackup.api.errors import MissingKeyError, NotFoundError, StorageConfigError
from pvebackup.kit.hoststate import HostState
from pvebackup.kit.passphrase import passphrase_source
from pvebackup.kit.units import parse_size
from pvebackup.storage.basepath import BASE_PATH_PROPERTIES, BasePath
from pvebackup.storage.bridgeprops import BRIDGE_PROPERTIES
from pvebackup.storage.plugin import COMMON_PROPERTIES, PRUNE_PROPERTIES
from pvebackup.storage.properties import (
    PropertyKind,
    PropertySpec,
    StorageProperties,
    parse_properties,
)
from pvebackup.store.backends import make_backend
from pvebackup.store.backends.base import validate_key
from pvebackup.store.backends.s3 import DEFAULT_MAX_REQUESTS, DEFAULT_REGION, S3Config
from pvebackup.store.datastore import Datastore
from pvebackup.store.formats import MAX_CHUNK_SIZE, MIN_CHUNK_SIZE
from pvebackup.store.index import check_chunk_size
from pvebackup.store.keys import EncryptionKey, load_key_file
from pvebackup.store.snapshotops import KeylessListing

__all__ = ["PROPERTIES", "S3_PROPERTIES", "StoreSettings"]


def _chunk_size(text: str) -> int:
    # The store's rule (a power of two) from check_chunk_size; out of range is
    # left to the spec's minimum/maximum, whose message says it in KiB/MiB.
    size = parse_size(text)
    return check_chunk_size(size) if MIN_CHUNK_SIZE <= size <= MAX_CHUNK_SIZE else size


def _endpoint(text: str) -> str:
    url = urlsplit(text)
    if url.scheme not in ("http", "https") or not url.hostname:
        raise ValueError(f"{text[:80]!r} is not an http:// or https:// URL")
    if url.username is not None or url.password is not None:
        # storage.cfg is world-readable on a PVE node: keys belong in s3-credentials.
        raise ValueError("the endpoint URL must not carry credentials (use s3-credentials)")
    return text


_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


def _bucket(text: str) -> str:
    if _BUCKET.fullmatch(text) is None or ".." in text:
        raise ValueError(f"{text[:80]!r} is not an S3 bucket name (3-63 of a-z 0-9 . -)")
    return text


def _prefix(text: str) -> str:
    text = text.strip("/")
    if text:
        try:
            validate_key(text)
        except Exception as exc:
            raise ValueError(f"{text[:80]!r} is not a key prefix (a/b, no . or .. parts)") from exc
    return text


S3_PROPERTIES: Mapping[str, PropertySpec] = {
    "s3-endpoint": PropertySpec(
        parser=_endpoint, description="S3 endpoint URL (https://s3.REGION.amazonaws.com)"
    ),
    "s3-bucket": PropertySpec(parser=_bucket, description="S3 bucket (instead of path)"),
    "s3-prefix": PropertySpec(parser=_prefix, description="key prefix in the bucket"),
    "s3-region": PropertySpec(default=DEFAULT_REGION, description="S3 region"),
    "s3-path-style": PropertySpec(
        PropertyKind.BOOL, default=True, description="path-style URLs (1) or virtual-host (0)"
    ),
    "s3-credentials": PropertySpec(
        PropertyKind.PATH, description="0600 file: 'access-key = ...', 'secret-key = ...'"
    ),
    "s3-max-requests": PropertySpec(
        PropertyKind.INT, minimum=1, maximum=256, default=DEFAULT_MAX_REQUESTS,
        description="S3 requests in flight at once",
    ),  # fmt: skip
}
"""The properties of a ``backup-store`` in an S3 bucket."""

PROPERTIES: Mapping[str, PropertySpec] = {
    **COMMON_PROPERTIES,
    **PRUNE_PROPERTIES,
    # Required unless s3-bucket is set (checked by StoreSettings.from_scfg).
    "path": PropertySpec(PropertyKind.PATH, description="datastore directory"),
    "encryption-key": PropertySpec(
        PropertyKind.PATH, description="key file (pvebackup key create)"
    ),
    "encryption-passphrase-file": PropertySpec(
        PropertyKind.PATH, description="file holding the passphrase of a protected key file"
    ),
    "chunk-size": PropertySpec(
        PropertyKind.SIZE,
        minimum=MIN_CHUNK_SIZE,
        maximum=MAX_CHUNK_SIZE,
        parser=_chunk_size,
        description="chunk size of new disk indexes: a power of two, 64K..16M "
        "(bytes, or with K or M)",
    ),
    "cache-dir": PropertySpec(
        PropertyKind.PATH,
        description="host directory for the chunk index and snapshot metadata caches "
        "(default: under the host state dir)",
    ),
    "ct-restore": PropertySpec(
        PropertyKind.ENUM,
        choices=("tar", "directory"),
        description="container restore mechanism offered to the host (default tar)",
    ),
    **BASE_PATH_PROPERTIES,
    **BRIDGE_PROPERTIES,
    **S3_PROPERTIES,
}
"""Every property a ``backup-store`` section may have."""


@dataclass(frozen=True, slots=True)
class StoreSettings:
    """The parsed properties of one ``backup-store`` storage."""

    storeid: str
    path: str
    key_file: str | None = None
    passphrase_file: str | None = None
    chunk_size: int | None = None
    ct_restore: str = "tar"
    backend: str = "local"
    base: BasePath | None = None
    s3: S3Config | None = None
    cache_dir: str | None = None

    @classmethod
    def from_scfg(cls, scfg: Mapping[str, str], storeid: str) -> StoreSettings:
        """The typed properties of ``scfg`` (see :data:`PROPERTIES`).

        :raises StorageConfigError: missing path, a value that does not parse
            (only for a scfg made in code: storage.cfg was checked when read).
        """
        props = parse_properties(PROPERTIES, scfg, storeid)
        key_file = props.optional_path("encryption-key")
        passphrase_file = props.optional_path("encryption-passphrase-file")
        s3 = _s3_config(props, storeid)
        cache = props.optional_path("cache-dir")
        cache_dir = None if cache is None else str(cache)
        if s3 is not None:
            return cls(
                storeid=storeid,
                path=f"s3://{s3.bucket}/{s3.prefix}",
                key_file=None if key_file is None else str(key_file),
                passphrase_file=None if passphrase_file is None else str(passphrase_file),
                chunk_size=props.number("chunk-size"),
                backend="s3",
                s3=s3,
                cache_dir=cache_dir,
            )
        return cls(
            storeid=storeid,
            path=str(props.path("path")),
            base=BasePath.from_properties(props, create_default=False),
            key_file=None if key_file is None else str(key_file),
            passphrase_file=None if passphrase_file is None else str(passphrase_file),
            chunk_size=props.number("chunk-size"),
            ct_restore=props.text("ct-restore") or "tar",
            cache_dir=cache_dir,
        )

    def cache_root(self, state_dir: Path | str | None = None) -> Path:
        """Where this storage's host-side caches live: ``cache-dir``, else
        ``<state dir>/backup-store/<storeid>``. Under it, ``chunkcache/<store id>``
        (the chunk index) and ``metacache/<store id>`` (manifests and sidecars
        for ``list``): per store id, so a store made anew never meets old entries.
        Never inside the storage: what the caches say steers dedup and listings."""
        if self.cache_dir is not None:
            return Path(self.cache_dir)
        return HostState("backup-store", self.storeid, state_dir).dir

    def load_key(self, *, interactive: bool = True) -> EncryptionKey | None:
        """The storage's key; a protected one is unlocked with its passphrase from
        ``encryption-passphrase-file``, else ``PVEBACKUP_PASSPHRASE_FILE``, else a
        prompt on a terminal (:mod:`pvebackup.kit.passphrase`; not if not
        ``interactive``: then ``MissingKeyError``)."""
        if self.key_file is None:
            return None
        # Nothing is read or asked for a plain key: the provider is called lazily.
        what = f"key file {self.key_file}"
        return load_key_file(
            self.key_file,
            passphrase_source(self.passphrase_file, what)
            if interactive
            else passphrase_source(self.passphrase_file, what, prompt=lambda _: None),
        )

    @property
    def location(self) -> str:
        """What :func:`make_backend` takes with :attr:`backend` (path or S3 config)."""
        return self.path if self.s3 is None else self.s3.location()

    def open_for_listing(self) -> Datastore | KeylessListing:
        """The store for ``list``: with its key if that is at hand without asking,
        else (no key configured, the key file missing, a protected key and no
        passphrase file) a :class:`KeylessListing`, as ``proxmox-backup-client
        snapshot list`` needs no key. A key that is there but wrong still fails.

        :raises StorageUnavailableError, NotFoundError: as :meth:`open`.
        :raises WrongKeyError, KeyFileError: a key file that is there but wrong.
        """
        key: EncryptionKey | None = None
        if self.key_file is not None and Path(self.key_file).exists():
            # A key file that is there but broken, unprotected or wrong is an error;
            # one that is absent (kept off this machine) is what listing without it
            # is for.
            try:
                key = self.load_key(interactive=False)
            except MissingKeyError:
                key = None  # protected, and no passphrase without asking
        if self.empty():
            raise NotFoundError(f"storage {self.storeid!r}: no datastore at {self.path}")
        backend = make_backend(self.backend, self.location)
        try:
            return Datastore.open(backend, key=key)
        except MissingKeyError:
            return KeylessListing(backend)

    def open_keyless(self) -> KeylessListing:
        """The store for ``remove`` and ``prune``: never with the key, which removal
        does not need (as PBS's ``snapshot forget``), and never able to write data.

        :raises StorageUnavailableError: as :meth:`open`.
        :raises NotFoundError: no datastore there.
        """
        if self.empty():
            raise NotFoundError(f"storage {self.storeid!r}: no datastore at {self.path}")
        return KeylessListing(make_backend(self.backend, self.location))

    def empty(self, *, create: bool = False) -> bool:
        """True while the storage holds no datastore yet (before the first backup).

        :raises StorageUnavailableError: not mounted, or the path is missing.
        """
        if self.s3 is not None:
            # One request: the first key under the prefix, if any.
            return not any(make_backend(self.backend, self.location).list())
        base = self.base or BasePath(self.storeid, Path(self.path))
        root = base.activate(create=create)
        return not any(root.iterdir())

    def open(self, *, create: bool = False, cache_dir: Path | None = None) -> Datastore:
        """Open the datastore; with ``create``, initialise an empty or new directory.

        The path itself is never created unless ``create`` and the storage's
        ``create-base-path`` allow it, and nothing at all while ``is_mountpoint``
        is set and nothing is mounted (see :mod:`pvebackup.storage.basepath`).

        :raises StorageUnavailableError: not mounted, or the path is missing (and
            may not be created); nothing was created.
        :raises NotFoundError: there is no store at ``path`` (and not ``create``).
        :raises MissingKeyError, WrongKeyError, KeyFileError: key problems, found
            before anything in the store is touched.

        ``cache_dir``: a host directory for the persistent chunk index cache
        (``Datastore``); never inside the storage.
        """
        key = self.load_key()
        empty = self.empty(create=create)
        if empty and not create:
            raise NotFoundError(f"storage {self.storeid!r}: no datastore at {self.path}")
        backend = make_backend(self.backend, self.location)
        if empty:
            if self.chunk_size is None:
                return Datastore.create(backend, key=key, cache_dir=cache_dir)
            return Datastore.create(
                backend, key=key, chunk_size=self.chunk_size, cache_dir=cache_dir
            )
        return Datastore.open(backend, key=key, cache_dir=cache_dir)

    def index_chunk_size(self, store: Datastore) -> int:
        """Chunk size of new indexes: the property, else the store's default."""
        return self.chunk_size or store.chunk_size


def _s3_config(props: StorageProperties, storeid: str) -> S3Config | None:
    """The S3 settings, None for a directory store; refuses a mix of both."""
    bucket = props.text("s3-bucket")
    s3_set = sorted(n for n in S3_PROPERTIES if n in props)
    if bucket is None:
        if s3_set:
            raise StorageConfigError(f"storage {storeid!r}: {', '.join(s3_set)} need s3-bucket")
        return None
    if "path" in props:
        raise StorageConfigError(f"storage {storeid!r}: path and s3-bucket exclude each other")
    endpoint = props.text("s3-endpoint")
    credentials = props.optional_path("s3-credentials")
    if endpoint is None or credentials is None:
        raise StorageConfigError(
            f"storage {storeid!r}: s3-bucket needs s3-endpoint and s3-credentials"
        )
    return S3Config(
        endpoint=endpoint,
        bucket=bucket,
        prefix=props.text("s3-prefix") or "",
        region=props.text("s3-region") or DEFAULT_REGION,
        path_style=props.flag("s3-path-style"),
        credentials_file=str(credentials),
        max_requests=props.number("s3-max-requests") or DEFAULT_MAX_REQUESTS,
    )
