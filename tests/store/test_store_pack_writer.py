"""The pack writer thread: a full pack is put beside the chunk work, never indexed early."""

from __future__ import annotations

import os
import threading

import pytest

from pvebackup.api.errors import TransientBackendError
from pvebackup.store.backends.memory import MemoryBackend
from pvebackup.store.datastore import Datastore

CHUNK = 65536
PACK = 1024 * 1024  # 16 random chunks of CHUNK fill it


class GatedBackend(MemoryBackend):
    """Pack puts wait for ``gate`` (or fail); every finished put is logged in order."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.gate.set()
        self.fail = False
        self.log: list[str] = []

    def put(self, key: str, data: bytes, *, overwrite: bool, durable: bool = True) -> bool:
        if key.startswith("packs/"):
            assert self.gate.wait(30)
            if self.fail:
                raise TransientBackendError(f"cannot write {key}: disk on fire")
        done = super().put(key, data, overwrite=overwrite, durable=durable)
        self.log.append(key)
        return done


def _store(backend: GatedBackend) -> Datastore:
    Datastore.create(backend, chunk_size=CHUNK, pack_size=PACK)
    return Datastore.open(backend)


def _fill(store: Datastore, n: int) -> list[bytes]:
    chunks = [os.urandom(CHUNK) for _ in range(n)]
    for c in chunks:
        store.insert_chunk(c)
    return chunks


def test_the_index_object_is_written_only_after_its_packs_are_stored() -> None:
    backend = GatedBackend()
    store = _store(backend)
    backend.gate.clear()
    _fill(store, 20)  # one full pack handed to the writer, a few chunks open
    flusher = threading.Thread(target=store.flush)
    flusher.start()
    flusher.join(0.5)
    assert flusher.is_alive()  # waits for the pack put
    assert not any(k.startswith("index/") for k in backend.list("index/"))
    backend.gate.set()
    flusher.join(30)
    order = [k.split("/")[0] for k in backend.log if k.split("/")[0] in ("packs", "index")]
    assert order == ["packs", "packs", "index"]
    assert Datastore.open(backend).index_entries() == store.rebuild_index_from_packs()


def test_a_chunk_in_a_pack_being_put_is_found_and_read() -> None:
    backend = GatedBackend()
    store = _store(backend)
    backend.gate.clear()
    chunks = _fill(store, 17)  # the 16th chunk sealed the pack: its put is waiting
    assert store.read_chunk(store.codec.digest(chunks[0]), CHUNK) == chunks[0]
    assert not store.insert_chunk(chunks[3]).is_new  # no second copy
    backend.gate.set()
    store.flush()
    assert len(store.rebuild_index_from_packs()) == 17


def test_a_failed_pack_put_fails_the_flush_and_its_chunks_are_stored_again() -> None:
    backend = GatedBackend()
    store = _store(backend)
    backend.fail = True
    chunks = _fill(store, 17)
    with pytest.raises(TransientBackendError):
        store.flush()
    assert list(backend.list("index/")) == [] and list(backend.list("packs/")) == []
    backend.fail = False
    # The lost pack's chunks count as absent: no later snapshot may reference them
    # without storing them again.
    assert store.insert_chunk(chunks[0]).is_new
    assert store.insert_chunk(chunks[16]).is_new  # the open pack went with the failure
    store.flush()
    assert len(store.rebuild_index_from_packs()) == 2
    assert Datastore.open(backend).index_entries() == store.rebuild_index_from_packs()
