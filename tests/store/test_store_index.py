"""Fixed index: round trips, random access, and rejection of any damage."""

from __future__ import annotations

import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pvebackup.api.errors import CorruptIndexError
from pvebackup.store.formats import FIXED_INDEX_HEADER, ZERO_DIGEST
from pvebackup.store.index import FixedIndex, FixedIndexWriter, check_chunk_size, chunk_count

CS = 64 * 1024
HDR = FIXED_INDEX_HEADER.size


def _digest(i: int) -> bytes:
    return i.to_bytes(4, "little") * 8


@st.composite
def indexes(draw: st.DrawFn) -> tuple[int, int, dict[int, bytes]]:
    chunk_size = draw(st.sampled_from([CS, 2 * CS, 1 << 20]))
    size = draw(st.integers(0, 20 * chunk_size))
    n = chunk_count(size, chunk_size)
    entries = draw(
        st.dictionaries(st.integers(0, max(n - 1, 0)), st.binary(min_size=32, max_size=32))
    )
    return size, chunk_size, entries if n else {}


@given(indexes())
def test_round_trip(spec: tuple[int, int, dict[int, bytes]]) -> None:
    size, chunk_size, entries = spec
    w = FixedIndexWriter(size, chunk_size, ctime=1234)
    for i, d in entries.items():
        w.set(i, d)
    data = w.to_bytes()
    idx = FixedIndex(data)
    assert (idx.size, idx.chunk_size, idx.ctime, idx.uuid) == (size, chunk_size, 1234, w.uuid)
    assert len(idx) == chunk_count(size, chunk_size)
    assert len(data) == HDR + 32 * len(idx)
    for i in range(len(idx)):
        assert idx.digest(i) == entries.get(i, ZERO_DIGEST)
        assert idx.is_zero(i) == (entries.get(i, ZERO_DIGEST) == ZERO_DIGEST)
    assert list(idx.digests()) == [idx.digest(i) for i in range(len(idx))]
    assert idx.to_bytes() == data


def test_extents_and_short_last_chunk() -> None:
    idx = FixedIndex(FixedIndexWriter(2 * CS + 100, CS).to_bytes())
    assert len(idx) == 3
    assert idx.extent(0) == (0, CS)
    assert idx.extent(2) == (2 * CS, 100)
    assert idx.chunk_at(2 * CS + 99) == 2
    with pytest.raises(IndexError):
        idx.digest(3)
    with pytest.raises(IndexError):
        idx.chunk_at(2 * CS + 100)


def test_large_image_is_one_buffer_not_many_objects() -> None:
    # 64 GiB at 256 KiB chunks: 262144 digests, 8 MiB, random access without a list.
    w = FixedIndexWriter(64 << 30, 256 * 1024)
    w.set(262143, _digest(7))
    idx = FixedIndex(w.to_bytes())
    assert len(idx) == 262144
    assert idx.digest(262143) == _digest(7)
    assert len(idx.raw_digests()) == 262144 * 32


@settings(max_examples=300)
@given(spec=indexes(), pos=st.data())
def test_any_bit_flip_is_rejected(
    spec: tuple[int, int, dict[int, bytes]], pos: st.DataObject
) -> None:
    size, chunk_size, entries = spec
    w = FixedIndexWriter(size, chunk_size)
    for i, d in entries.items():
        w.set(i, d)
    data = bytearray(w.to_bytes())
    bit = pos.draw(st.integers(0, len(data) * 8 - 1))
    data[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(CorruptIndexError):
        FixedIndex(bytes(data), name="test.fidx")


@given(cut=st.integers(0, HDR + 32 * 4 - 1))
def test_truncation_and_extension_are_rejected(cut: int) -> None:
    data = FixedIndexWriter(4 * CS, CS).to_bytes()
    with pytest.raises(CorruptIndexError):
        FixedIndex(data[:cut])
    with pytest.raises(CorruptIndexError, match="bytes, expected"):
        FixedIndex(data + bytes(32))


def test_error_names_the_index() -> None:
    with pytest.raises(CorruptIndexError, match="drive-scsi0"):
        FixedIndex(b"garbage" * 100, name="drive-scsi0")


def test_writer_from_previous_index_keeps_digests_with_new_identity() -> None:
    w = FixedIndexWriter(4 * CS, CS)
    w.set(1, _digest(1))
    w.set(3, _digest(3))
    prev = FixedIndex(w.to_bytes())
    w2 = FixedIndexWriter.from_index(prev)
    w2.set(3, _digest(33))
    new = FixedIndex(w2.to_bytes())
    assert new.uuid != prev.uuid
    assert [new.digest(i) for i in range(4)] == [ZERO_DIGEST, _digest(1), ZERO_DIGEST, _digest(33)]
    assert w2.get(1) == _digest(1)


def test_writer_context_commits_only_on_success() -> None:
    got: list[bytes] = []
    with FixedIndexWriter(CS, CS, on_commit=got.append) as w:
        w.set(0, _digest(5))
    assert w.committed and FixedIndex(got[0]).digest(0) == _digest(5)
    got.clear()
    with pytest.raises(RuntimeError):
        with FixedIndexWriter(CS, CS, on_commit=got.append) as w:
            raise RuntimeError("backup failed")
    assert got == [] and not w.committed


def test_writer_validates_input() -> None:
    w = FixedIndexWriter(CS, CS, uuid=uuid.UUID(int=1))
    with pytest.raises(ValueError):
        w.set(0, b"short")
    with pytest.raises(IndexError):
        w.set(1, _digest(1))
    for bad in (1000, 3 * CS, 32 << 20):
        with pytest.raises(ValueError):
            check_chunk_size(bad)
    with pytest.raises(ValueError):
        FixedIndexWriter(-1, CS)
