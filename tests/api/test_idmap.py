"""IdMapper and parse_lxc_idmap."""

from __future__ import annotations

import pytest

from pvebackup.api.idmap import (
    DEFAULT_UNPRIVILEGED_MAP,
    OVERFLOW_ID,
    IdMapper,
    parse_lxc_idmap,
)
from pvebackup.api.types import IdMapEntry

# Proxmox VE's common pattern: ct uid 1000 is host uid 1000, the rest shifted.
PASSTHROUGH = [
    parse_lxc_idmap("u 0 100000 1000"),
    parse_lxc_idmap("u 1000 1000 1"),
    parse_lxc_idmap("u 1001 101001 64535"),
    parse_lxc_idmap("g 0 100000 65536"),
]


def test_empty_map_is_identity() -> None:
    m = IdMapper([])
    assert m.is_identity
    for i in (0, 1, 1000, 100000, 2**32 - 1):
        assert m.host_to_ct_uid(i) == i
        assert m.host_to_ct_gid(i) == i
        assert m.ct_to_host_uid(i) == i
        assert m.ct_to_host_gid(i) == i


def test_default_unprivileged_map_boundaries() -> None:
    m = IdMapper(DEFAULT_UNPRIVILEGED_MAP)
    assert not m.is_identity
    assert m.ct_to_host_uid(0) == 100000
    assert m.ct_to_host_gid(65535) == 165535
    assert m.host_to_ct_uid(100000) == 0
    assert m.host_to_ct_uid(165535) == 65535
    assert m.host_to_ct_uid(99999) == OVERFLOW_ID
    assert m.host_to_ct_gid(165536) == OVERFLOW_ID
    assert m.host_to_ct_uid(0) == OVERFLOW_ID
    with pytest.raises(ValueError, match="uid 65536"):
        m.ct_to_host_uid(65536)


def test_multiple_ranges() -> None:
    m = IdMapper(PASSTHROUGH)
    assert m.ct_to_host_uid(999) == 100999
    assert m.ct_to_host_uid(1000) == 1000
    assert m.ct_to_host_uid(1001) == 101001
    assert m.ct_to_host_uid(65535) == 165535
    assert m.host_to_ct_uid(1000) == 1000
    assert m.host_to_ct_uid(101000) == OVERFLOW_ID
    assert m.host_to_ct_uid(101001) == 1001
    assert m.host_to_ct_uid(100999) == 999
    # gids are mapped independently of uids.
    assert m.ct_to_host_gid(1000) == 101000
    for ct in (0, 5, 999, 1000, 1001, 40000, 65535):
        assert m.host_to_ct_uid(m.ct_to_host_uid(ct)) == ct


def test_map_without_group_ranges_maps_no_gid() -> None:
    m = IdMapper([IdMapEntry("u", 0, 100000, 10)])
    assert m.host_to_ct_gid(100000) == OVERFLOW_ID
    with pytest.raises(ValueError):
        m.ct_to_host_gid(0)


@pytest.mark.parametrize(
    "entries",
    [
        ["u 0 100000 1000", "u 999 200000 10"],  # container side overlaps
        ["u 0 100000 1000", "u 1000 100999 10"],  # host side overlaps
        ["g 0 100000 10", "g 5 300000 1"],
    ],
)
def test_overlapping_ranges_are_refused(entries: list[str]) -> None:
    with pytest.raises(ValueError, match="overlapping"):
        IdMapper([parse_lxc_idmap(e) for e in entries])


def test_same_range_numbers_for_uid_and_gid_do_not_overlap() -> None:
    IdMapper(DEFAULT_UNPRIVILEGED_MAP)
    IdMapper([parse_lxc_idmap("u 0 100000 10"), parse_lxc_idmap("u 10 100010 10")])


@pytest.mark.parametrize(
    "line",
    [
        "u 0 100000 65536",
        "  u  0 100000   65536 ",
        "lxc.idmap: u 0 100000 65536",
        "lxc.idmap = u 0 100000 65536",
    ],
)
def test_parse(line: str) -> None:
    assert parse_lxc_idmap(line) == IdMapEntry("u", 0, 100000, 65536)


@pytest.mark.parametrize(
    "line",
    [
        "",
        "x 0 1 2",
        "u 0 100000",
        "u 0 100000 65536 7",
        "u a 1 2",
        "u -1 1 2",
        "u 0 1 0",
        "u 0 4294967295 2",
        "lxc.other: u 0 1 2",
    ],
)
def test_parse_rejects(line: str) -> None:
    with pytest.raises(ValueError):
        parse_lxc_idmap(line)


def test_parse_round_trips_as_list() -> None:
    assert parse_lxc_idmap("g 1 2 3").as_list() == ["g", "1", "2", "3"]
