"""pvebackup.store: the deduplicating, compressing, optionally encrypting chunk store.

Start with ``Datastore.create``/``Datastore.open`` on a backend
(``backends.local.LocalBackend``, ``backends.memory.MemoryBackend``). Chunks go in
with ``insert_chunk`` (or ``prepare_chunk`` on worker threads, then
``store_prepared``) and come back verified with ``read_chunk``; a backup is a
``new_snapshot`` writer holding fixed indexes (``index.FixedIndexWriter``) and
files, made visible by its manifest. Design: docs/design.md ("The chunk store");
layouts: docs/file-formats.md.
"""

from pvebackup.store.datastore import DEFAULT_CHUNK_SIZE, Datastore, InsertResult, StoreConfig
from pvebackup.store.formats import ZERO_DIGEST
from pvebackup.store.index import FixedIndex, FixedIndexWriter
from pvebackup.store.keys import EncryptionKey, create_key_file, load_key_file
from pvebackup.store.snapshot import Manifest, Snapshot, SnapshotId, SnapshotWriter

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "ZERO_DIGEST",
    "Datastore",
    "EncryptionKey",
    "FixedIndex",
    "FixedIndexWriter",
    "InsertResult",
    "Manifest",
    "Snapshot",
    "SnapshotId",
    "SnapshotWriter",
    "StoreConfig",
    "create_key_file",
    "load_key_file",
]
