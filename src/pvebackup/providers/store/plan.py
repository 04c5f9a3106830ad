"""Which chunks of a disk a backup must build, and from what.

A fixed-size index cuts the disk into chunks of ``chunk_size`` bytes (the last one
may be shorter). A backup turns the extents the NBD export reports into one
:class:`ChunkJob` per chunk it has to (re)build:

- full (bitmap mode ``none``/``new``): every chunk. The ``reads`` are the
  allocated, not-known-zero parts inside it; a chunk without any is a zero chunk
  and is never read.
- incremental (``reuse``): only the chunks touched by dirty extents. ``reads`` are
  exactly the dirty parts inside the chunk, nothing else: the export refuses reads
  outside dirty extents. When they do not cover the whole chunk, ``base`` names
  the previous chunk whose bytes fill the rest.

Everything here is pure arithmetic on ``(offset, length)`` pairs, so it is tested
on its own (including with hypothesis).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from pvebackup.kit.nbdsource import Range, merge_ranges

__all__ = ["ChunkJob", "Range", "full_jobs", "incremental_jobs", "merge_ranges", "split_by_chunk"]


@dataclass(frozen=True, slots=True)
class ChunkJob:
    """One chunk to build.

    :ivar index: position of the chunk in the index.
    :ivar offset: disk offset of its first byte (``index * chunk_size``).
    :ivar length: its length (``chunk_size``, less for the last chunk).
    :ivar reads: the disk ranges to read over NBD, sorted, inside the chunk.
    :ivar base: digest of the previous chunk that supplies the bytes not read,
        or ``None`` when they are zero (full backups) or everything is read.
    """

    index: int
    offset: int
    length: int
    reads: tuple[Range, ...]
    base: bytes | None = None

    @property
    def read_bytes(self) -> int:
        return sum(length for _, length in self.reads)

    @property
    def is_zero(self) -> bool:
        """Nothing to read and nothing to copy: the chunk is all zero bytes."""
        return not self.reads and self.base is None

    @property
    def is_whole(self) -> bool:
        """The reads cover the whole chunk."""
        return self.read_bytes == self.length


def split_by_chunk(ranges: Iterable[Range], chunk_size: int) -> Iterator[tuple[int, list[Range]]]:
    """Cut sorted, non-overlapping ``ranges`` at chunk boundaries.

    Yields ``(chunk_index, ranges inside that chunk)`` in ascending chunk order,
    only for chunks that some range touches.
    """
    current: int | None = None
    parts: list[Range] = []
    for offset, length in ranges:
        end = offset + length
        while offset < end:
            index = offset // chunk_size
            piece_end = min(end, (index + 1) * chunk_size)
            if index != current:
                if parts:
                    assert current is not None
                    yield current, parts
                current, parts = index, []
            if parts and parts[-1][0] + parts[-1][1] == offset:
                parts[-1] = (parts[-1][0], parts[-1][1] + piece_end - offset)
            else:
                parts.append((offset, piece_end - offset))
            offset = piece_end
    if parts:
        assert current is not None
        yield current, parts


def _chunk_count(size: int, chunk_size: int) -> int:
    return (size + chunk_size - 1) // chunk_size


def _clip(ranges: Iterable[Range], size: int) -> list[Range]:
    return merge_ranges(
        (offset, min(length, size - offset)) for offset, length in ranges if offset < size
    )


def full_jobs(size: int, chunk_size: int, data: Iterable[Range]) -> Iterator[ChunkJob]:
    """Every chunk of a disk of ``size`` bytes; ``data`` are the ranges to read.

    Chunks that no data range touches come out as zero jobs (``is_zero``).
    """
    touched = split_by_chunk(_clip(data, size), chunk_size)
    nxt = next(touched, None)
    for index in range(_chunk_count(size, chunk_size)):
        offset = index * chunk_size
        length = min(chunk_size, size - offset)
        reads: tuple[Range, ...] = ()
        if nxt is not None and nxt[0] == index:
            reads = tuple(nxt[1])
            nxt = next(touched, None)
        yield ChunkJob(index, offset, length, reads)


def incremental_jobs(
    size: int, chunk_size: int, dirty: Iterable[Range], previous: Callable[[int], bytes]
) -> Iterator[ChunkJob]:
    """The chunks touched by ``dirty`` ranges, rebuilt on top of ``previous``.

    :param previous: digest of chunk ``i`` in the previous index of this disk
        (same size and chunk size: the caller checks); untouched chunks keep theirs.
    """
    for index, parts in split_by_chunk(_clip(dirty, size), chunk_size):
        offset = index * chunk_size
        length = min(chunk_size, size - offset)
        whole = sum(p[1] for p in parts) == length
        yield ChunkJob(index, offset, length, tuple(parts), None if whole else previous(index))
