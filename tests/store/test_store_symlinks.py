"""A datastore on a local directory whose chunk directories were made symlinks.

Whoever can write the store plants ``chunks/<xx>`` (or ``chunks``) as a link to a
host directory: a backup must fail with a typed error and write nothing there.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pvebackup.api.errors import UnsafeStorageError
from pvebackup.store.backends.local import LocalBackend
from pvebackup.store.datastore import Datastore

DATA = b"guest data " * 1000


@pytest.mark.parametrize("planted", ["chunks", "chunks/{xx}"])
def test_backup_into_a_symlinked_chunk_directory_fails_and_writes_nothing_outside(
    tmp_path: Path, planted: str
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    store = Datastore.create(LocalBackend(tmp_path / "store"))
    xx = store.chunk_key(store.codec.digest(DATA)).split("/")[1]
    link = tmp_path / "store" / planted.format(xx=xx)
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_dir():
        os.rmdir(link)
    link.symlink_to(outside)
    with pytest.raises(UnsafeStorageError):
        store.insert_chunk(DATA)
    assert os.listdir(outside) == []
