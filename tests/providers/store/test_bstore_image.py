"""SnapshotImage: extents from the index, reads across chunks, damaged chunks."""

from __future__ import annotations

import pytest

from pvebackup.api.errors import CorruptChunkError
from pvebackup.providers.store.image import EXTENT_DATA, EXTENT_HOLE_ZERO, SnapshotImage
from pvebackup.store.formats import ZERO_DIGEST
from pvebackup.store.index import FixedIndex, FixedIndexWriter

CS = 64 * 1024


def _image(bad: int | None = None) -> SnapshotImage:
    writer = FixedIndexWriter(4 * CS + 100, CS)
    chunks = {i: bytes([i + 1]) * min(CS, 4 * CS + 100 - i * CS) for i in (0, 1, 4)}
    for i in chunks:
        writer.set(i, bytes([i + 1]) * 32)
    index = FixedIndex(writer.to_bytes())

    def read_chunk(digest: bytes, size: int) -> bytes:
        i = digest[0] - 1
        if i == bad:
            raise CorruptChunkError(f"chunk {digest.hex()}: tag mismatch")
        assert digest != ZERO_DIGEST
        return chunks[i]

    return SnapshotImage(read_chunk, index, "snapshot vm/100/x device d", read_ahead=2)


def test_extents_merge_zero_chunks_into_holes() -> None:
    img = _image()
    try:
        assert img.extents(img.size, 0) == [
            (0, 2 * CS, EXTENT_DATA),
            (2 * CS, 2 * CS, EXTENT_HOLE_ZERO),
            (4 * CS, 100, EXTENT_DATA),
        ]
        assert img.extents(10, CS + 5) == [(CS + 5, 10, EXTENT_DATA)]
    finally:
        img.close()


def test_pread_across_chunks_and_holes() -> None:
    img = _image()
    try:
        buf = bytearray(2 * CS + 50)
        img.pread(buf, CS - 25)
        assert buf[:25] == b"\x01" * 25
        assert buf[25 : 25 + CS] == b"\x02" * CS
        assert buf[25 + CS :] == bytes(CS + 25)
        tail = bytearray(100)
        img.pread(tail, 4 * CS)
        assert tail == b"\x05" * 100
    finally:
        img.close()


def test_damaged_chunk_names_snapshot_chunk_and_digest() -> None:
    img = _image(bad=1)
    try:
        with pytest.raises(CorruptChunkError, match=r"vm/100/x device d: chunk 1 \(0202"):
            img.pread(bytearray(10), CS + 1)
        # Chunk 0 still reads: the failure is confined to the damaged chunk.
        buf = bytearray(10)
        img.pread(buf, 0)
        assert buf == b"\x01" * 10
    finally:
        img.close()
