"""Dynamic index: round trip, random access, and rejection of hostile indexes."""

from __future__ import annotations

import struct

import pytest

from pvebackup.api.errors import CorruptIndexError
from pvebackup.store.dynindex import DynamicIndex, DynamicIndexWriter
from pvebackup.store.formats import DYNAMIC_INDEX_HEADER, MAX_CHUNK_SIZE

HDR = DYNAMIC_INDEX_HEADER.size


def _digest(i: int) -> bytes:
    return i.to_bytes(4, "little") * 8


def _index(lengths: list[int]) -> bytes:
    w = DynamicIndexWriter()
    for i, n in enumerate(lengths):
        w.append(n, _digest(i))
    return w.to_bytes()


def _reseal(data: bytearray) -> bytes:
    """Recompute the checksum, as an attacker writing the store can."""
    import hashlib

    data[52:84] = bytes(32)
    data[52:84] = hashlib.sha256(bytes(data)).digest()
    return bytes(data)


def test_round_trip_and_lookup() -> None:
    idx = DynamicIndex(_index([5, 100, 1, 7]))
    assert (len(idx), idx.size) == (4, 113)
    assert [idx.extent(i) for i in range(4)] == [(0, 5), (5, 100), (105, 1), (106, 7)]
    assert idx.digest(2) == _digest(2)
    assert [idx.chunk_at(o) for o in (0, 4, 5, 104, 105, 106, 112)] == [0, 0, 1, 1, 2, 3, 3]
    assert idx.is_boundary(105) and not idx.is_boundary(104) and idx.is_boundary(113)
    assert list(idx.digests()) == [_digest(i) for i in range(4)]
    with pytest.raises(IndexError):
        idx.chunk_at(113)


def test_empty_stream() -> None:
    idx = DynamicIndex(_index([]))
    assert (len(idx), idx.size) == (0, 0)


def test_any_bit_flip_is_rejected() -> None:
    data = _index([3, 9, 4])
    for pos in range(0, len(data), 7):
        bad = bytearray(data)
        bad[pos] ^= 0x10
        with pytest.raises(CorruptIndexError):
            DynamicIndex(bytes(bad))


def test_forged_count_is_refused_before_allocation() -> None:
    bad = bytearray(_index([3]))
    struct.pack_into("<Q", bad, 40, 1 << 40)  # count far beyond the size
    with pytest.raises(CorruptIndexError, match="out of range"):
        DynamicIndex(_reseal(bad))


@pytest.mark.parametrize(
    "ends",
    [
        [5, 5],  # an empty chunk
        [5, 3],  # backwards
        [5, 5 + MAX_CHUNK_SIZE + 1],  # oversized chunk
    ],
)
def test_hostile_ends_are_refused(ends: list[int]) -> None:
    bad = bytearray(_index([1] * len(ends)))
    for i, end in enumerate(ends):
        struct.pack_into("<Q", bad, HDR + 40 * i, end)
    struct.pack_into("<Q", bad, 32, ends[-1])  # size agrees with the last end
    with pytest.raises(CorruptIndexError, match="ends at"):
        DynamicIndex(_reseal(bad))


def test_size_must_match_last_end() -> None:
    bad = bytearray(_index([4, 4]))
    struct.pack_into("<Q", bad, 32, 9)
    with pytest.raises(CorruptIndexError, match="cover"):
        DynamicIndex(_reseal(bad))


def test_writer_refuses_bad_chunks() -> None:
    w = DynamicIndexWriter()
    with pytest.raises(ValueError):
        w.append(0, _digest(0))
    with pytest.raises(ValueError):
        w.append(MAX_CHUNK_SIZE + 1, _digest(0))
