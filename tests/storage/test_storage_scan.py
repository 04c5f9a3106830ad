"""StoragePlugin.scan_volumes: a plugin that only implements list_volumes keeps
working with ``pvebackup list`` (no damaged volumes to report)."""

from __future__ import annotations

from collections.abc import Mapping

import pytest

from pvebackup.api.errors import UnsupportedError
from pvebackup.api.types import GuestType
from pvebackup.storage import StoragePlugin, VolumeInfo, VolumeScan


class OnlyList(StoragePlugin):
    type = "only-list"

    def list_volumes(self, scfg: Mapping[str, str], storeid: str) -> list[VolumeInfo]:
        return [VolumeInfo(f"{storeid}:backup/a", 100, GuestType.QEMU, 0, 1, "f")]


def test_base_scan_wraps_list_volumes() -> None:
    scan = OnlyList().scan_volumes({}, "s1")
    assert scan == VolumeScan([VolumeInfo("s1:backup/a", 100, GuestType.QEMU, 0, 1, "f")], [])


def test_base_scan_of_a_storage_without_backups_is_unsupported() -> None:
    class Plain(StoragePlugin):
        type = "plain"

    with pytest.raises(UnsupportedError):
        Plain().scan_volumes({}, "s1")
