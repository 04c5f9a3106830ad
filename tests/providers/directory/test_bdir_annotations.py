"""backup-dir sidecars: never written through a symlinked volume, never follow a link."""

from __future__ import annotations

from pathlib import Path

import pytest

from pvebackup.api.errors import UnsafeStorageError, VolumeNotFoundError
from pvebackup.api.types import GuestType
from pvebackup.kit.annotations import VerifyState
from pvebackup.providers.directory import annotations
from pvebackup.providers.directory.volumes import BackupIndex, VolumeLayout, VolumeName

T0 = 1_700_000_000


def _volume(root: Path, ctime: int = T0) -> str:
    name = VolumeName(GuestType.LXC, 100, ctime)
    directory = root / "backup" / name.dirname
    directory.mkdir(parents=True)
    index = BackupIndex(vmid=100, vmtype=GuestType.LXC, ctime=ctime, ct_format="tar")
    (directory / "index.json").write_text(index.to_json())
    return str(name)


def test_symlinked_volume_directory_is_never_written_through(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    _volume(outside)  # a real-looking volume somewhere else
    layout = VolumeLayout(tmp_path / "bd")
    name = VolumeName(GuestType.LXC, 100, T0)
    (tmp_path / "bd" / "backup").mkdir(parents=True)
    # Hostile input: the volume directory is a symlink out of the storage.
    (tmp_path / "bd" / "backup" / name.dirname).symlink_to(outside / "backup" / name.dirname)
    volname = str(name)
    for call in (
        lambda: annotations.write_notes(layout, volname, "x"),
        lambda: annotations.set_protected(layout, volname, True),
        lambda: annotations.write_verify_state(layout, volname, VerifyState("ok", 1)),
    ):
        with pytest.raises((UnsafeStorageError, VolumeNotFoundError)):
            call()
    assert sorted(p.name for p in (outside / "backup" / name.dirname).iterdir()) == [
        "index.json"
    ]


def test_directory_at_protected_counts_and_is_left_alone(tmp_path: Path) -> None:
    layout = VolumeLayout(tmp_path / "bd")
    volname = _volume(tmp_path / "bd")
    planted = layout.volume_path(volname) / "protected"
    planted.mkdir()
    (planted / "keep").write_text("x")
    assert annotations.is_protected(layout, volname)
    with pytest.raises(UnsafeStorageError):
        annotations.set_protected(layout, volname, False)
    assert (planted / "keep").read_text() == "x"


def test_roundtrip_and_missing_volume(tmp_path: Path) -> None:
    layout = VolumeLayout(tmp_path / "bd")
    volname = _volume(tmp_path / "bd")
    annotations.write_notes(layout, volname, "a\nb")
    annotations.set_protected(layout, volname, True)
    annotations.write_verify_state(layout, volname, VerifyState("failed", 7))
    assert annotations.read_notes(layout, volname) == "a\nb"
    assert annotations.is_protected(layout, volname)
    assert annotations.read_verify_state(layout, volname) == VerifyState("failed", 7)
    with pytest.raises(VolumeNotFoundError):
        annotations.read_notes(layout, str(VolumeName(GuestType.LXC, 100, T0 + 1)))
