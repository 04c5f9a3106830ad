"""The seed's id map shape: ``["u", "0", "100000", "65536"]`` lists, wrapped typed."""

from __future__ import annotations

from typing import Any

import pytest

from pvebackup.api import IdMapEntry, IdMapper
from pvebackup.api.errors import UsageError
from pvebackup.kit.fsxattrs import ContainerIds

SEED = [["u", "0", "100000", "65536"], ["g", "0", "100000", "65536"]]


def test_idmapper_takes_the_seeds_lists_as_they_are() -> None:
    mapper = IdMapper(SEED)
    assert mapper.host_to_ct_uid(100033) == 33 and mapper.ct_to_host_gid(5) == 100005
    assert mapper.id_map == (IdMapEntry("u", 0, 100000, 65536), IdMapEntry("g", 0, 100000, 65536))
    assert [e.as_list() for e in mapper.id_map] == SEED  # and back, exactly
    assert IdMapEntry.from_seed(("u", "1", "2", "3")) == IdMapEntry("u", 1, 2, 3)


@pytest.mark.parametrize(
    "entry",
    [
        ["u", "0", "100000"],  # three fields
        ["u", "0", "100000", "65536", "x"],
        "u 0 100000 65536",  # a string is a sequence too: refused
        ["x", "0", "100000", "65536"],
        ["u", "-1", "100000", "65536"],
        ["u", "0x10", "100000", "65536"],
        ["u", "0", "100000", "0"],
        ["u", "٣", "100000", "65536"],  # a non-ASCII digit int() would accept
        ["u", "0", True, "65536"],
        ["u", "0", None, "65536"],
    ],
)
def test_hostile_seed_entries_are_value_errors(entry: Any) -> None:
    with pytest.raises(ValueError):
        IdMapEntry.from_seed(entry)
    with pytest.raises(ValueError):
        IdMapper([entry])


def test_backup_directory_with_a_malformed_id_map_is_a_usage_error() -> None:
    # What backup-dir does with what it receives: a typed error, not a traceback.
    with pytest.raises(UsageError, match="unusable id map"):
        ContainerIds([["u", "0", "100000"]])
    with pytest.raises(UsageError, match="overlapping"):
        ContainerIds([["u", "0", "100000", "10"], ["u", "5", "200000", "10"]])
