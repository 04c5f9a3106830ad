"""Chunk planning: which chunks a full or incremental backup builds, and from what."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from pvebackup.providers.store.plan import (
    full_jobs,
    incremental_jobs,
    merge_ranges,
    split_by_chunk,
)

CS = 1024


def test_merge_ranges_joins_overlapping_and_touching() -> None:
    assert merge_ranges([(10, 5), (0, 10), (20, 0), (30, 5), (32, 10)]) == [(0, 15), (30, 12)]


def test_split_by_chunk_cuts_at_boundaries() -> None:
    assert list(split_by_chunk([(1000, 100), (2048, 2048)], CS)) == [
        (0, [(1000, 24)]),
        (1, [(1024, 76)]),
        (2, [(2048, 1024)]),
        (3, [(3072, 1024)]),
    ]


def test_full_jobs_marks_untouched_chunks_zero_and_short_last_chunk() -> None:
    jobs = list(full_jobs(3 * CS + 100, CS, [(CS + 10, 20)]))
    assert [j.index for j in jobs] == [0, 1, 2, 3]
    assert [j.is_zero for j in jobs] == [True, False, True, True]
    assert jobs[1].reads == ((CS + 10, 20),)
    assert jobs[1].base is None
    assert jobs[3].length == 100


def test_full_jobs_clips_data_beyond_the_end() -> None:
    jobs = list(full_jobs(CS + 10, CS, [(CS, 5000)]))
    assert jobs[1].reads == ((CS, 10),)


def test_incremental_jobs_only_touched_chunks_with_base_when_partial() -> None:
    prev = [bytes([i]) * 32 for i in range(4)]
    jobs = list(incremental_jobs(4 * CS, CS, [(CS + 100, 50), (2 * CS, CS)], prev.__getitem__))
    assert [j.index for j in jobs] == [1, 2]
    assert jobs[0].base == prev[1] and jobs[0].reads == ((CS + 100, 50),)
    assert jobs[1].base is None and jobs[1].is_whole


ranges = st.lists(st.tuples(st.integers(0, 20 * CS), st.integers(0, 3 * CS)), max_size=12)


@given(size=st.integers(1, 16 * CS), data=ranges)
def test_full_jobs_reads_exactly_the_data_inside_the_disk(size: int, data: list) -> None:
    jobs = list(full_jobs(size, CS, data))
    assert sum(j.length for j in jobs) == size
    read = merge_ranges(r for j in jobs for r in j.reads)
    assert read == merge_ranges((o, min(n, size - o)) for o, n in data if o < size)
    for j in jobs:
        for off, n in j.reads:
            assert j.offset <= off and off + n <= j.offset + j.length


@given(size=st.integers(1, 16 * CS), dirty=ranges)
def test_incremental_jobs_never_read_outside_dirty(size: int, dirty: list) -> None:
    count = (size + CS - 1) // CS
    prev = [i.to_bytes(32, "big") for i in range(count)]
    jobs = list(incremental_jobs(size, CS, dirty, prev.__getitem__))
    allowed = merge_ranges((o, min(n, size - o)) for o, n in dirty if o < size)
    assert merge_ranges(r for j in jobs for r in j.reads) == allowed
    for j in jobs:
        assert (j.base is None) == j.is_whole
        if j.base is not None:
            assert j.base == prev[j.index]
