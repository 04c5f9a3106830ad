"""Which ranged reads fetch a batch of chunks: one per run of neighbours in a pack.

A restore reads an image's chunks in order, and a full backup stored them in that
order, so most of a batch sits back to back in one pack. On S3 every read is a
request (latency and a bill), so the batch is fetched as a few *spans*: chunks of
one pack whose blobs lie at most ``max_gap`` bytes apart are read with one ranged
GET covering them all (the gap bytes are read and dropped), up to ``max_span``
bytes per read.

Threat: locations come from index objects in the storage (hostile input).
Overlapping or absurd offsets cannot make a read larger than ``max_span`` plus one
blob's length (a blob's length is bounded where index objects are parsed), and a
span only ever covers blobs that some location named.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from pvebackup.store.chunkindex import ChunkLocation

__all__ = ["MAX_GAP", "MAX_SPAN", "Span", "plan_spans"]

MAX_GAP: Final = 256 * 1024
"""Dead bytes between two blobs still read in one request (a GET costs ~2-20 ms:
at 100 MB/s that is 0.2-2 MB of transfer)."""
MAX_SPAN: Final = 16 * 1024 * 1024
"""Most bytes one ranged read covers: bounds the memory of one read-ahead worker."""


@dataclass(frozen=True, slots=True)
class Span:
    """One ranged read: ``[start, end)`` of ``pack``, and the chunks it serves.

    ``members``: ``(position in the batch, location)``; every member's blob lies
    inside the span.
    """

    pack: bytes
    start: int
    end: int
    members: tuple[tuple[int, ChunkLocation], ...]


def plan_spans(
    located: Sequence[tuple[int, ChunkLocation]],
    *,
    max_gap: int = MAX_GAP,
    max_span: int = MAX_SPAN,
) -> list[Span]:
    """Group ``(position, location)`` pairs into spans (see the module docstring)."""
    by_pack: dict[bytes, list[tuple[int, ChunkLocation]]] = {}
    for pos, loc in located:
        by_pack.setdefault(loc.pack, []).append((pos, loc))
    spans: list[Span] = []
    for pack, members in by_pack.items():
        members.sort(key=lambda m: (m[1].offset, m[1].length))
        cur: list[tuple[int, ChunkLocation]] = []
        start = end = 0
        for pos, loc in members:
            blob_end = loc.offset + loc.length
            if cur and loc.offset - end <= max_gap and max(end, blob_end) - start <= max_span:
                cur.append((pos, loc))
                end = max(end, blob_end)
                continue
            if cur:
                spans.append(Span(pack, start, end, tuple(cur)))
            cur, start, end = [(pos, loc)], loc.offset, blob_end
        if cur:
            spans.append(Span(pack, start, end, tuple(cur)))
    return spans
