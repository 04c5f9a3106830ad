"""The provider keeps the chunk index cache on the host, and lets it go at job end."""

from __future__ import annotations

from pathlib import Path

import pytest
from bstore_support import FakeHost, mixed_image

from pvebackup.api.types import BitmapMode
from pvebackup.kit.hoststate import default_state_dir
from pvebackup.store.chunkcache import SortedChunkIndex, open_chunk_cache

pytestmark = pytest.mark.e2e


def test_cache_is_host_state_and_free_after_the_job(host: FakeHost, tmp_path: Path) -> None:
    src = mixed_image(tmp_path / "src.qcow2", size=1 << 20)
    host.backup(src, BitmapMode.NEW)
    p = host.provider()
    store_id = p.store().config.store_id
    assert not isinstance(open_chunk_cache(p.chunk_cache_dir / store_id), SortedChunkIndex)
    p.job_end()  # saves and releases the cache
    cache = default_state_dir() / "backup-store" / "store1" / "chunkcache" / store_id
    assert p.chunk_cache_dir == cache.parent
    assert (cache / "chunks.idx").stat().st_size > 0  # saved at job end
    # nothing of it in the storage, whose content anyone with write access forges
    assert not any("chunkcache" in str(f) or f.name == "chunks.idx"
                   for f in Path(host.scfg["path"]).rglob("*"))
    # released: another process can take the cache now
    again = open_chunk_cache(cache)
    assert isinstance(again, SortedChunkIndex) and len(again) > 0
    again.close()


def test_cache_dir_property_moves_the_caches(tmp_path: Path) -> None:
    from pvebackup.providers.store.provider import BackupStoreProvider
    from pvebackup.providers.store.settings import StoreSettings

    scfg = {"type": "backup-store", "path": str(tmp_path / "st"),
            "cache-dir": str(tmp_path / "cache")}  # fmt: skip
    settings = StoreSettings.from_scfg(scfg, "store1")
    assert settings.cache_root() == tmp_path / "cache"
    provider = BackupStoreProvider(None, scfg, "store1", lambda level, msg: None)
    assert provider.chunk_cache_dir == tmp_path / "cache" / "chunkcache"
    # Default: the host state directory of the storage.
    del scfg["cache-dir"]
    default = StoreSettings.from_scfg(scfg, "store1").cache_root()
    assert default == default_state_dir() / "backup-store" / "store1"
