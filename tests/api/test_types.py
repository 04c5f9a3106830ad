"""The typed values compare equal to the seed's strings."""

from __future__ import annotations

from enum import StrEnum

import pytest

from pvebackup.api import (
    BackupMechanism,
    BitmapMode,
    DeviceInfo,
    GuestType,
    IdMapEntry,
    LogLevel,
    RestoreMechanism,
)


@pytest.mark.parametrize(
    ("enum", "values"),
    [
        (GuestType, ["qemu", "lxc"]),
        (BackupMechanism, ["nbd", "directory"]),
        (RestoreMechanism, ["qemu-img", "tar", "directory"]),
        (BitmapMode, ["none", "new", "reuse"]),
        (LogLevel, ["info", "warn", "err"]),
    ],
)
def test_enum_values_are_the_seeds_strings(enum: type[StrEnum], values: list[str]) -> None:
    assert [m.value for m in enum] == values
    for value in values:
        member = enum(value)
        assert member == value
        assert str(member) == value
        assert f"{member}" == value
        assert isinstance(member, str)


def test_unknown_values_are_refused() -> None:
    with pytest.raises(ValueError):
        GuestType("openvz")
    with pytest.raises(ValueError):
        RestoreMechanism("vma")


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("x", 0, 100000, 65536), "kind must be 'u' or 'g'"),
        (("u", -1, 100000, 65536), "invalid id map range"),
        (("u", 0, -5, 65536), "invalid id map range"),
        (("g", 0, 100000, 0), "invalid id map range"),
    ],
)
def test_id_map_entry_validation(args: tuple[str, int, int, int], needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        IdMapEntry(*args)


def test_id_map_entry_fields() -> None:
    entry = IdMapEntry("g", 0, 100000, 65536)
    assert (entry.kind, entry.ct_start, entry.host_start, entry.count) == ("g", 0, 100000, 65536)
    assert entry == IdMapEntry("g", 0, 100000, 65536)


def test_device_info_shape() -> None:
    info: DeviceInfo = {"drive-scsi0": {"size": 1 << 30}}
    assert info["drive-scsi0"]["size"] == 1073741824
