"""A ``backup-store`` storage's properties, and opening its datastore.

::

    backup-store: store1
        path /srv/pvebackup-store       # the datastore directory (local backend)
        encryption-key /etc/pvebackup/store1.key
        encryption-passphrase-file /etc/pvebackup/store1.pass   # only for protected keys
        chunk-size 262144                # for new indexes; default: the store's

The backend is chosen in one place (:func:`make_backend`, ``local`` for now), so
that S3 can join later without touching the provider. The key is loaded and
checked against the store's config before any data is read or written: an
encrypted store without a key raises :class:`MissingKeyError`, a wrong key
:class:`WrongKeyError`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from pvebackup.api.errors import NotFoundError, StorageConfigError
from pvebackup.providers.store.restore_source import make_backend
from pvebackup.store.datastore import Datastore
from pvebackup.store.index import check_chunk_size
from pvebackup.store.keys import EncryptionKey, load_key_file

__all__ = ["StoreSettings"]


@dataclass(frozen=True, slots=True)
class StoreSettings:
    """The parsed properties of one ``backup-store`` storage."""

    storeid: str
    path: str
    key_file: str | None = None
    passphrase_file: str | None = None
    chunk_size: int | None = None
    backend: str = "local"

    @classmethod
    def from_scfg(cls, scfg: Mapping[str, str], storeid: str) -> StoreSettings:
        """Parse ``scfg``. :raises StorageConfigError: missing path, bad chunk size."""
        path = scfg.get("path")
        if not path:
            raise StorageConfigError(f"storage {storeid!r}: backup-store needs 'path'")
        chunk_size: int | None = None
        raw = scfg.get("chunk-size")
        if raw:
            try:
                chunk_size = check_chunk_size(_parse_size(raw))
            except ValueError as exc:
                raise StorageConfigError(f"storage {storeid!r}: chunk-size: {exc}") from exc
        return cls(
            storeid=storeid,
            path=path,
            key_file=scfg.get("encryption-key") or None,
            passphrase_file=scfg.get("encryption-passphrase-file") or None,
            chunk_size=chunk_size,
        )

    def load_key(self) -> EncryptionKey | None:
        """The storage's key, unlocked with the passphrase file when protected."""
        if self.key_file is None:
            return None
        passphrase_file = self.passphrase_file
        if passphrase_file is None:
            # A protected key then fails with MissingKeyError, naming the key file.
            return load_key_file(self.key_file)

        def passphrase() -> str:
            try:
                with open(passphrase_file, encoding="utf-8") as f:
                    return f.readline().rstrip("\n")
            except OSError as exc:
                raise StorageConfigError(
                    f"storage {self.storeid!r}: cannot read encryption-passphrase-file "
                    f"{passphrase_file}: {exc.strerror}"
                ) from exc
            except UnicodeDecodeError as exc:
                raise StorageConfigError(
                    f"storage {self.storeid!r}: encryption-passphrase-file "
                    f"{passphrase_file} is not UTF-8 text"
                ) from exc

        return load_key_file(self.key_file, passphrase)

    def open(self, *, create: bool = False) -> Datastore:
        """Open the datastore; with ``create``, initialise an empty or new directory.

        :raises NotFoundError: there is no store at ``path`` (and not ``create``).
        :raises MissingKeyError, WrongKeyError, KeyFileError: key problems, found
            before anything in the store is touched.
        """
        key = self.load_key()
        root = Path(self.path)
        empty = not root.exists() or (root.is_dir() and not any(root.iterdir()))
        if empty and not create:
            raise NotFoundError(f"storage {self.storeid!r}: no datastore at {self.path}")
        backend = make_backend(self.backend, self.path)
        if empty:
            kwargs = {} if self.chunk_size is None else {"chunk_size": self.chunk_size}
            return Datastore.create(backend, key=key, **kwargs)
        return Datastore.open(backend, key=key)

    def index_chunk_size(self, store: Datastore) -> int:
        """Chunk size of new indexes: the property, else the store's default."""
        return self.chunk_size or store.chunk_size


def _parse_size(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20}
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    if t and t[-1] in units:
        return int(t[:-1]) * units[t[-1]]
    return int(t)
