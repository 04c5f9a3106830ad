"""The one volume name scheme (pvebackup.kit.volname), shared by both providers."""

from __future__ import annotations

import pytest

from pvebackup.api.types import GuestType
from pvebackup.kit.volname import MAX_TIME, BackupVolname, format_time, parse_time
from pvebackup.providers.directory.volumes import VolumeName
from pvebackup.store.snapshot import SnapshotId

T0 = 1796158347  # 2026-12-01T20:52:27Z


def test_the_scheme_is_the_documented_one() -> None:
    assert str(BackupVolname(GuestType.QEMU, 100, T0)) == "backup/vm-100-2026-12-01T20:52:27Z"
    assert str(BackupVolname(GuestType.LXC, 101, T0)) == "backup/ct-101-2026-12-01T20:52:27Z"
    assert BackupVolname(GuestType.LXC, 101, T0).dirname == "ct-101-2026-12-01T20:52:27Z"


def test_both_providers_name_a_backup_alike() -> None:
    for guest in GuestType:
        name = str(BackupVolname(guest, 4242, T0))
        assert str(VolumeName(guest, 4242, T0)) == name  # backup-dir
        assert SnapshotId(guest, 4242, T0).volname == name  # backup-store
        assert VolumeName.parse(name) == VolumeName(guest, 4242, T0)
        assert SnapshotId.from_volname(name) == SnapshotId(guest, 4242, T0)


def test_names_sort_by_time() -> None:
    times = [0, 59, 3600, T0, T0 + 1, MAX_TIME]
    names = [str(BackupVolname(GuestType.QEMU, 7, t)) for t in times]
    assert sorted(names) == names


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("backup/qemu-100-2026_12_01-20_52_27", "not a backup volume name"),  # old: never parsed
        ("backup/vm-100-2026-02-31T00:00:00Z", "impossible time"),
        ("backup/vm-100-2026-12-01T24:00:00Z", "impossible time"),
        ("backup/vm-100-0001-01-01T00:00:00Z", "out of range"),
        ("backup/vm-100-1969-12-31T23:59:59Z", "out of range"),
        ("backup/vm-0100-2026-12-01T20:52:27Z", "not a backup volume name"),
        ("backup/vm-100-2026-12-01T20:52:27Z\n", "not a backup volume name"),
        ("backup/vm-100-２026-12-01T20:52:27Z", "not a backup volume name"),
    ],
)
def test_hostile_names_are_refused(name: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        BackupVolname.parse(name)


def test_time_round_trip() -> None:
    assert parse_time(format_time(T0)) == T0
    with pytest.raises(ValueError):
        BackupVolname(GuestType.QEMU, 0, T0)
