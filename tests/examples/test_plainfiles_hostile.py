"""The example provider on hostile storage content (no host, no tools needed)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[2] / "examples/plainfiles"
sys.path.insert(0, str(EXAMPLE / "src"))

from pvebackup_plainfiles.plugin import PlainFilesPlugin  # noqa: E402

from pvebackup.api.errors import IntegrityError, VolumeNotFoundError  # noqa: E402

GOOD = '{"vmid": 100, "vmtype": "qemu", "ctime": 1, "stored": 4, "devices": {"drive-scsi0": 4}}'


def make_volume(base: Path, volname: str, meta: str) -> Path:
    vol = base / volname
    vol.mkdir(parents=True)
    (vol / "meta.json").write_text(meta)
    return vol


def test_damaged_meta_is_reported_and_hides_nothing(tmp_path: Path) -> None:
    make_volume(tmp_path, "vm-100-20261201T000000Z", GOOD)
    make_volume(tmp_path, "vm-100-20261201T000001Z", '{"vmid": "x"}')
    make_volume(tmp_path, "vm-100-20261201T000002Z", "[" * 100_000)  # over the size bound
    scan = PlainFilesPlugin().scan_volumes({"path": str(tmp_path)}, "p")
    assert [v.volid for v in scan.volumes] == ["p:vm-100-20261201T000000Z"]
    assert sorted(d.volid for d in scan.damaged) == [
        "p:vm-100-20261201T000001Z",
        "p:vm-100-20261201T000002Z",
    ]


def test_symlinked_image_is_never_handed_to_the_host(tmp_path: Path) -> None:
    vol = make_volume(tmp_path, "vm-100-20261201T000000Z", GOOD)
    secret = tmp_path / "secret"
    secret.write_text("host secret\n")
    os.symlink(secret, vol / "drive-scsi0.raw")
    provider = PlainFilesPlugin().new_backup_provider({"path": str(tmp_path)}, "p", print)
    with pytest.raises(IntegrityError, match="not a regular file"):
        provider.restore_qemu_img_init("vm-100-20261201T000000Z", "p", "drive-scsi0")


def test_symlinked_volume_and_foreign_names_are_refused(tmp_path: Path) -> None:
    elsewhere = make_volume(tmp_path / "other", "x", GOOD)
    store = tmp_path / "store"
    store.mkdir()
    os.symlink(elsewhere, store / "vm-100-20261201T000000Z")
    plugin = PlainFilesPlugin()
    provider = plugin.new_backup_provider({"path": str(store)}, "p", print)
    with pytest.raises(IntegrityError, match="not a directory"):
        provider.extract_guest_config("vm-100-20261201T000000Z", "p")
    with pytest.raises(VolumeNotFoundError):
        plugin.free_volume({"path": str(store)}, "p", "../other/x")
    assert (elsewhere / "meta.json").exists()
