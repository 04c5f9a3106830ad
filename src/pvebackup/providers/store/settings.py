"""A ``backup-store`` storage's properties, and opening its datastore.

::

    backup-store: store1
        path /srv/pvebackup-store       # the datastore directory (local backend)
        encryption-key /etc/pvebackup/store1.key
        encryption-passphrase-file /etc/pvebackup/store1.pass   # only for protected keys
        chunk-size 256K                  # for new indexes; default: the store's
        ct-restore tar                   # container restore mechanism: tar or directory
        is_mountpoint yes                # usable only while a file system is mounted there
        create-base-path 0               # create path when missing (default no: refused)

Without ``encryption-passphrase-file``, a protected key's passphrase comes from
the file named by ``PVEBACKUP_PASSPHRASE_FILE``, else a prompt on a terminal.
The key and passphrase files must be private to their owner (mode 0600 or
0400): like OpenSSH, we refuse them otherwise (:class:`UnprotectedKeyFileError`).

The backend is chosen in one place (:func:`pvebackup.store.backends.make_backend`,
``local`` for now), so that S3 can join later without touching the provider. The key is loaded and
checked against the store's config before any data is read or written: an
encrypted store without a key raises :class:`MissingKeyError`, a wrong key
:class:`WrongKeyError`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from pvebackup.api.errors import NotFoundError
from pvebackup.kit.passphrase import passphrase_source
from pvebackup.kit.units import parse_size
from pvebackup.storage.basepath import BASE_PATH_PROPERTIES, BasePath
from pvebackup.storage.plugin import COMMON_PROPERTIES, PRUNE_PROPERTIES
from pvebackup.storage.properties import PropertyKind, PropertySpec, parse_properties
from pvebackup.store.backends import make_backend
from pvebackup.store.datastore import Datastore
from pvebackup.store.formats import MAX_CHUNK_SIZE, MIN_CHUNK_SIZE
from pvebackup.store.index import check_chunk_size
from pvebackup.store.keys import EncryptionKey, load_key_file

__all__ = ["PROPERTIES", "StoreSettings"]


def _chunk_size(text: str) -> int:
    # The store's rule (a power of two) from check_chunk_size; out of range is
    # left to the spec's minimum/maximum, whose message says it in KiB/MiB.
    size = parse_size(text)
    return check_chunk_size(size) if MIN_CHUNK_SIZE <= size <= MAX_CHUNK_SIZE else size


PROPERTIES: Mapping[str, PropertySpec] = {
    **COMMON_PROPERTIES,
    **PRUNE_PROPERTIES,
    "path": PropertySpec(PropertyKind.PATH, required=True, description="datastore directory"),
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
    "ct-restore": PropertySpec(
        PropertyKind.ENUM,
        choices=("tar", "directory"),
        description="container restore mechanism offered to the host (default tar)",
    ),
    **BASE_PATH_PROPERTIES,
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

    @classmethod
    def from_scfg(cls, scfg: Mapping[str, str], storeid: str) -> StoreSettings:
        """The typed properties of ``scfg`` (see :data:`PROPERTIES`).

        :raises StorageConfigError: missing path, a value that does not parse
            (only for a scfg made in code: storage.cfg was checked when read).
        """
        props = parse_properties(PROPERTIES, scfg, storeid)
        key_file = props.optional_path("encryption-key")
        passphrase_file = props.optional_path("encryption-passphrase-file")
        return cls(
            storeid=storeid,
            path=str(props.path("path")),
            base=BasePath.from_properties(props, create_default=False),
            key_file=None if key_file is None else str(key_file),
            passphrase_file=None if passphrase_file is None else str(passphrase_file),
            chunk_size=props.number("chunk-size"),
            ct_restore=props.text("ct-restore") or "tar",
        )

    def load_key(self) -> EncryptionKey | None:
        """The storage's key; a protected one is unlocked with its passphrase from
        ``encryption-passphrase-file``, else ``PVEBACKUP_PASSPHRASE_FILE``, else a
        prompt on a terminal (:mod:`pvebackup.kit.passphrase`)."""
        if self.key_file is None:
            return None
        # Nothing is read or asked for a plain key: the provider is called lazily.
        return load_key_file(
            self.key_file,
            passphrase_source(self.passphrase_file, f"key file {self.key_file}"),
        )

    def empty(self, *, create: bool = False) -> bool:
        """True while the storage holds no datastore yet (before the first backup).

        :raises StorageUnavailableError: not mounted, or the path is missing.
        """
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
        backend = make_backend(self.backend, self.path)
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

