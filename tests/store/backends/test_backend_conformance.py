"""The backend contract (store/backends/base.py), checked on every backend."""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest

from pvebackup.api.errors import ObjectNotFoundError, PermanentBackendError
from pvebackup.store.backends.base import Backend, validate_key


def test_satisfies_protocol(backend: Backend) -> None:
    assert isinstance(backend, Backend)


def test_put_get_round_trip(backend: Backend) -> None:
    assert backend.put("a/b/c", b"hello", overwrite=False) is True
    assert backend.get("a/b/c") == b"hello"
    assert backend.put("empty", b"", overwrite=False)
    assert backend.get("empty") == b""


def test_missing_key(backend: Backend) -> None:
    with pytest.raises(ObjectNotFoundError):
        backend.get("nope")
    with pytest.raises(ObjectNotFoundError):
        backend.stat("no/such/key")
    assert backend.exists("nope") is False


def test_prefix_of_keys_is_not_an_object(backend: Backend) -> None:
    backend.put("dir/obj", b"x", overwrite=False)
    assert not backend.exists("dir")
    with pytest.raises(ObjectNotFoundError):
        backend.get("dir")
    with pytest.raises(ObjectNotFoundError):
        backend.stat("dir")


def test_put_without_overwrite_is_idempotent_no_op(backend: Backend) -> None:
    assert backend.put("k", b"first", overwrite=False)
    assert backend.put("k", b"second", overwrite=False) is False
    assert backend.get("k") == b"first"


def test_put_with_overwrite_replaces(backend: Backend) -> None:
    backend.put("k", b"first", overwrite=False)
    assert backend.put("k", b"second!", overwrite=True)
    assert backend.get("k") == b"second!"
    assert backend.stat("k").size == 7


def test_stat_and_exists(backend: Backend) -> None:
    backend.put("x/y", b"12345", overwrite=False, durable=False)
    info = backend.stat("x/y")
    assert info.size == 5 and info.mtime > 0
    assert backend.exists("x/y")


def test_delete_is_idempotent(backend: Backend) -> None:
    backend.put("k", b"v", overwrite=False)
    backend.delete("k")
    assert not backend.exists("k")
    backend.delete("k")
    backend.delete("never/was")


def test_list_by_prefix(backend: Backend) -> None:
    keys = ["chunks/ab12/ab12ff", "chunks/ab13/ab13ff", "chunks/cd00/cd00ff", "config.json"]
    for k in keys:
        backend.put(k, b"v", overwrite=False)
    assert sorted(backend.list()) == sorted(keys)
    assert sorted(backend.list("chunks/")) == keys[:3]
    assert sorted(backend.list("chunks/ab1")) == keys[:2]
    assert sorted(backend.list("chunks/ab12/")) == keys[:1]
    assert sorted(backend.list("chunks/ab12/ab12f")) == keys[:1]
    assert list(backend.list("nothing/")) == []
    assert list(backend.list("conf")) == ["config.json"]


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "/abs",
        "a//b",
        "a/../b",
        "./a",
        "a/.hidden",
        "tab\tkey",
        "back\\slash",
        "é",
        "trailing/",
        "sp ace",
        "del\x7f",
        "nl\n",
    ],
)
def test_invalid_keys_are_refused(backend: Backend, bad: str) -> None:
    with pytest.raises(PermanentBackendError):
        backend.put(bad, b"x", overwrite=True)
    with pytest.raises(PermanentBackendError):
        backend.get(bad)
    with pytest.raises(PermanentBackendError):
        validate_key(bad)


@pytest.mark.parametrize(
    "good",
    [
        "config.json",
        "chunks/ab/ab12",
        "snapshots/vm/100/2026-11-26T09:30:00Z/m.json",
        "a-b_c.d~!",
        "x/y.z/-",
    ],
)
def test_valid_keys_are_accepted(good: str) -> None:
    assert validate_key(good) == good


def test_sync_keeps_objects(backend: Backend) -> None:
    backend.put("k", b"v", overwrite=False, durable=False)
    backend.sync()
    assert backend.get("k") == b"v"


def test_second_handle_sees_the_same_store(make_backend: Callable[[], Backend]) -> None:
    a, b = make_backend(), make_backend()
    a.put("shared", b"data", overwrite=False)
    assert b.get("shared") == b"data"
    assert b.put("shared", b"other", overwrite=False) is False


def test_concurrent_inserts_of_one_key_write_exactly_once(backend: Backend) -> None:
    results: list[bool] = []
    lock = threading.Lock()
    barrier = threading.Barrier(8)

    def insert(i: int) -> None:
        barrier.wait()
        ok = backend.put("race", f"writer {i}".encode(), overwrite=False)
        with lock:
            results.append(ok)

    threads = [threading.Thread(target=insert, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count(True) == 1
    assert backend.get("race").startswith(b"writer ")


def test_concurrent_overwrites_are_atomic(backend: Backend) -> None:
    payloads = [bytes([i]) * 200_000 for i in range(4)]
    backend.put("obj", payloads[0], overwrite=True)
    stop = threading.Event()
    seen: set[bytes] = set()

    def reader() -> None:
        while not stop.is_set():
            data = backend.get("obj")
            seen.add(data[:1] + data[-1:] + len(data).to_bytes(4, "little"))

    t = threading.Thread(target=reader)
    t.start()
    for _ in range(20):
        for p in payloads:
            backend.put("obj", p, overwrite=True, durable=False)
    stop.set()
    t.join()
    allowed = {p[:1] + p[-1:] + len(p).to_bytes(4, "little") for p in payloads}
    assert seen and seen <= allowed


def test_get_range_reads_a_slice_and_clips_at_the_end(backend: Backend) -> None:
    backend.put("p/pack", bytes(range(100)), overwrite=False)
    assert backend.get_range("p/pack", 10, 5) == bytes(range(10, 15))
    assert backend.get_range("p/pack", 0, 0) == b""
    assert backend.get_range("p/pack", 95, 10) == bytes(range(95, 100))
    assert backend.get_range("p/pack", 200, 10) == b""
    with pytest.raises(ObjectNotFoundError):
        backend.get_range("p/missing", 0, 1)
    with pytest.raises(PermanentBackendError):
        backend.get_range("p/pack", -1, 5)
    with pytest.raises(PermanentBackendError):
        backend.get_range("p/pack", 0, -5)
