"""plan_spans: neighbours in a pack become one read; hostile locations stay bounded."""

from __future__ import annotations

from pvebackup.store.chunkindex import ChunkLocation
from pvebackup.store.readplan import plan_spans

P, Q = b"p" * 32, b"q" * 32


def test_neighbours_in_one_pack_are_one_span_out_of_order_too() -> None:
    locs = [(0, ChunkLocation(P, 300, 100, 1)), (1, ChunkLocation(P, 0, 100, 1)),
            (2, ChunkLocation(P, 100, 200, 1)), (3, ChunkLocation(Q, 0, 50, 1))]  # fmt: skip
    spans = sorted(plan_spans(locs), key=lambda s: s.pack)
    assert [(s.pack, s.start, s.end) for s in spans] == [(P, 0, 400), (Q, 0, 50)]
    assert sorted(pos for pos, _ in spans[0].members) == [0, 1, 2]


def test_a_gap_or_the_span_limit_splits() -> None:
    locs = [(0, ChunkLocation(P, 0, 10, 1)), (1, ChunkLocation(P, 10 + 1000, 10, 1)),
            (2, ChunkLocation(P, 1020, 10, 1))]  # fmt: skip
    assert len(plan_spans(locs, max_gap=999)) == 2
    assert len(plan_spans(locs, max_gap=1000)) == 1
    assert len(plan_spans(locs, max_gap=1000, max_span=1000)) == 2


def test_hostile_overlapping_locations_never_make_a_read_beyond_the_limit() -> None:
    # An index object (storage content) may name overlapping or duplicate blobs.
    locs = [(i, ChunkLocation(P, (i * 7919) % 5000, 3000, 1)) for i in range(200)]
    spans = plan_spans(locs, max_gap=100, max_span=4000)
    for span in spans:
        assert span.end - span.start <= 4000
        for _, loc in span.members:
            assert span.start <= loc.offset and loc.offset + loc.length <= span.end
    assert sorted(p for s in spans for p, _ in s.members) == list(range(200))
