"""A datastore on a local directory whose pack or index directory was made a symlink.

Whoever can write the store plants ``packs`` (or ``index``) as a link to a host
directory: a backup must fail with a typed error and write nothing there.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pvebackup.api.errors import UnsafeStorageError
from pvebackup.store.backends.local import LocalBackend
from pvebackup.store.datastore import Datastore

DATA = b"guest data " * 1000


@pytest.mark.parametrize("planted", ["packs", "index"])
def test_backup_into_a_symlinked_chunk_directory_fails_and_writes_nothing_outside(
    tmp_path: Path, planted: str
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    store = Datastore.create(LocalBackend(tmp_path / "store"))
    link = tmp_path / "store" / planted
    link.symlink_to(outside)
    if planted == "index":  # a pack first, so that flush reaches the index object
        os.makedirs(tmp_path / "store" / "packs")
    with pytest.raises(UnsafeStorageError):
        store.insert_chunk(DATA)
        store.flush()
    assert os.listdir(outside) == []
