"""``remove_backup_volume``: a protected volume is kept even by a plugin that forgets."""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import pytest

from pvebackup.api.errors import UnsupportedError, VolumeProtectedError
from pvebackup.api.types import GuestType
from pvebackup.cli.cmd_prune import keep_options, prune_volumes
from pvebackup.kit.prune import Mark
from pvebackup.storage import AttributeValue, StoragePlugin, VolumeInfo, remove_backup_volume


class Forgetful(StoragePlugin):
    """Records protection but removes whatever free_volume is asked to (a plugin bug)."""

    type: ClassVar[str] = "forgetful"

    def __init__(self) -> None:
        self.protected: set[str] = set()
        self.removed: list[str] = []

    def get_volume_attribute(
        self, scfg: Mapping[str, str], storeid: str, volname: str, attribute: str
    ) -> AttributeValue | None:
        return volname in self.protected if attribute == "protected" else None

    def free_volume(self, scfg: Mapping[str, str], storeid: str, volname: str) -> None:
        self.removed.append(volname)


def test_protected_volume_is_not_handed_to_free_volume() -> None:
    plugin = Forgetful()
    plugin.protected.add("a")
    with pytest.raises(VolumeProtectedError, match="is protected"):
        remove_backup_volume(plugin, {}, "s", "a")
    remove_backup_volume(plugin, {}, "s", "b")
    assert plugin.removed == ["b"]


def test_base_class_defaults_protect_nothing_and_refuse_updates() -> None:
    plugin = Forgetful()
    assert StoragePlugin.get_volume_attribute(plugin, {}, "s", "v", "notes") is None
    with pytest.raises(UnsupportedError, match="'notes' is not supported"):
        plugin.update_volume_attribute({}, "s", "v", "notes", "x")


def test_prune_keeps_a_volume_protected_after_the_listing() -> None:
    """Protected between the scan and the removal: kept, named, not a failure."""
    volumes = [
        VolumeInfo(f"s:v{t}", 100, GuestType.QEMU, 1_700_000_000 + t, 1, "f") for t in range(3)
    ]

    def remove(volid: str) -> None:
        raise VolumeProtectedError(f"backup {volid} is protected")

    results = prune_volumes(volumes, keep_options({"last": 1}), remove)
    gone = [r for r in results if r.mark is Mark.REMOVE]
    assert len(gone) == 2 and all(not r.removed and "protected" in r.reason for r in gone)
    assert all(r.exit_code == 0 for r in results)
