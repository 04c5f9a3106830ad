"""The benchmark's input generator: deterministic, mixed, placed where the layout says."""

from __future__ import annotations

from pathlib import Path

import pytest
import zstandard
from bench.inputs import (
    REGION,
    WRITE_ALIGN,
    WRITE_SIZE,
    Layout,
    change_writes,
    qemu_io_commands,
    region_bytes,
    write_raw,
)

MiB = 1 << 20


def _ratio(data: bytes) -> float:
    return len(data) / len(zstandard.ZstdCompressor(level=1).compress(data))


def test_regions_are_deterministic_and_differ_by_seed_and_index() -> None:
    assert region_bytes(7, 1) == region_bytes(7, 1)
    assert region_bytes(7, 1) != region_bytes(8, 1)
    assert region_bytes(7, 0) != region_bytes(7, 2)
    assert len(region_bytes(7, 0)) == len(region_bytes(7, 1)) == REGION


def test_even_regions_are_random_and_odd_regions_text_like() -> None:
    random_ratio = _ratio(region_bytes(3, 0))
    text = region_bytes(3, 1)
    assert random_ratio < 1.01
    assert 2.5 <= _ratio(text) <= 6.0
    assert text.count(b"\n") > 1000 and b"\0" not in text


def test_layout_rejects_sizes_that_do_not_fit() -> None:
    with pytest.raises(ValueError):
        Layout(REGION + 1, 4 * REGION)
    with pytest.raises(ValueError):
        Layout(2 * REGION, 3 * REGION)
    sparse = Layout(2 * REGION, 8 * REGION)
    assert (sparse.regions, sparse.stride, sparse.region_offset(1)) == (2, 4 * REGION, 4 * REGION)


def test_raw_image_places_regions_with_holes_between(tmp_path: Path) -> None:
    layout = Layout(2 * REGION, 4 * REGION)
    path = tmp_path / "sparse.raw"
    write_raw(path, layout, seed=11)
    data = path.read_bytes()
    assert len(data) == 4 * REGION
    assert data[:REGION] == region_bytes(11, 0)
    assert data[REGION : 2 * REGION] == bytes(REGION)
    assert data[2 * REGION : 3 * REGION] == region_bytes(11, 1)
    assert path.stat().st_blocks * 512 < 3 * REGION  # the holes are not allocated


def test_change_is_deterministic_aligned_and_inside_regions() -> None:
    layout = Layout(8 * REGION, 8 * REGION)
    writes = change_writes(layout, seed=5, count=160)
    assert writes == change_writes(layout, seed=5, count=160)
    assert writes != change_writes(layout, seed=6, count=160)
    assert len(writes) == 160
    for w in writes:
        assert 0 <= w.region < 8
        assert w.inner % WRITE_ALIGN == 0 and w.inner + WRITE_SIZE <= REGION
        assert 1 <= w.pattern <= 255


def test_change_hits_the_same_data_in_dense_and_sparse_images() -> None:
    dense, sparse = Layout(4 * REGION, 4 * REGION), Layout(4 * REGION, 64 * REGION)
    writes = change_writes(dense, seed=5, count=10)
    for w in writes:
        assert w.offset(sparse) - sparse.region_offset(w.region) == (
            w.offset(dense) - dense.region_offset(w.region)
        )
    args = qemu_io_commands(sparse, writes[:1])
    w = writes[0]
    assert args == ["-c", f"write -q -P {w.pattern} {w.offset(sparse)} {WRITE_SIZE}"]
