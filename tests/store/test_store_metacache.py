"""MetaCache: served only for the listed (key, tag), stored only when the tag is the MD5."""

from __future__ import annotations

import hashlib
from pathlib import Path

from pvebackup.store.metacache import MetaCache


def _md5(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def test_hit_only_for_the_listed_tag_and_size(tmp_path: Path) -> None:
    cache = MetaCache(tmp_path / "c")
    data = b"manifest v1"
    cache.put("snapshots/vm/1/t/manifest.json", _md5(data), data)
    assert cache.get("snapshots/vm/1/t/manifest.json", _md5(data), len(data)) == data
    # Another node replaced the object: the listing shows a new tag -> a miss.
    assert cache.get("snapshots/vm/1/t/manifest.json", _md5(b"v2"), len(data)) is None
    assert cache.get("snapshots/vm/1/t/manifest.json", _md5(data), len(data) + 1) is None
    assert cache.get("snapshots/vm/2/t/manifest.json", _md5(data), len(data)) is None


def test_not_stored_when_the_bytes_are_not_what_the_tag_says(tmp_path: Path) -> None:
    # The object changed between our listing (old tag) and our read (new bytes):
    # caching the new bytes under the old tag could serve them for the old object.
    cache = MetaCache(tmp_path / "c")
    cache.put("k", _md5(b"old"), b"new")
    assert cache.get("k", _md5(b"old"), 3) is None
    assert cache.get("k", _md5(b"new"), 3) is None
    # A multipart ETag is no MD5 of the bytes: never cached.
    cache.put("k", "0123456789abcdef0123456789abcdef-2", b"new")
    assert not (tmp_path / "c").exists() or not any((tmp_path / "c").iterdir())


def test_a_damaged_or_swapped_cache_file_is_a_miss(tmp_path: Path) -> None:
    cache = MetaCache(tmp_path / "c")
    a, b = b"notes of A", b"notes of B"
    cache.put("a", _md5(a), a)
    cache.put("b", _md5(b), b)
    pa, pb = (next(p for p in (tmp_path / "c").iterdir() if p.read_bytes().endswith(x))
              for x in (a, b))  # fmt: skip
    # Entries renamed onto each other: the header names another key.
    pa.write_bytes(pb.read_bytes())
    assert cache.get("a", _md5(a), len(a)) is None
    # Bytes flipped behind a matching header: the MD5 check catches it.
    raw = bytearray(pb.read_bytes())
    raw[-1] ^= 1
    pb.write_bytes(bytes(raw))
    assert cache.get("b", _md5(b), len(b)) is None


def test_retain_drops_entries_of_keys_no_longer_listed(tmp_path: Path) -> None:
    cache = MetaCache(tmp_path / "c")
    for key in ("a", "b", "c"):
        cache.put(key, _md5(key.encode()), key.encode())
    assert cache.retain(["b"]) == 2
    assert cache.get("b", _md5(b"b"), 1) == b"b"
    assert cache.get("a", _md5(b"a"), 1) is None
