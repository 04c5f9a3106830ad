"""What the export asks QEMU to open for each kind of disk (``DiskSpec``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pvebackup.api.errors import NotFoundError
from pvebackup.host.qemu.export import DiskSpec
from pvebackup.storage import GuestVolume


def test_a_file_is_opened_with_the_file_driver(tmp_path: Path) -> None:
    image = tmp_path / "vm-100-disk-0.raw"
    image.write_bytes(b"\0" * 512)
    spec = DiskSpec("drive-scsi0", image, "raw")
    assert spec.file_node() == {"driver": "file", "filename": str(image)}
    assert spec.image_name() == str(image)
    spec.check_present()


def test_a_missing_image_is_not_found(tmp_path: Path) -> None:
    spec = DiskSpec("drive-scsi0", tmp_path / "gone.raw", "raw")
    with pytest.raises(NotFoundError, match="does not exist"):
        spec.check_present()
    # a directory is no disk either (a subvol named as a VM disk)
    with pytest.raises(NotFoundError):
        DiskSpec("drive-scsi0", tmp_path, "raw").check_present()


def test_a_block_device_is_opened_as_host_device() -> None:
    # /dev/null is a character device: only block devices get host_device
    assert DiskSpec("d", Path("/dev/null"), "raw").file_node()["driver"] == "file"
    lv = GuestVolume("/dev/pve/vm-100-disk-0", "raw", "host_device")
    spec = DiskSpec("d", Path(lv.path), "raw", lv)
    assert spec.file_node() == {"driver": "host_device", "filename": "/dev/pve/vm-100-disk-0"}
    assert spec.image_name() == "/dev/pve/vm-100-disk-0"


def test_an_rbd_image_goes_through_qemus_rbd_driver() -> None:
    vol = GuestVolume(
        "rbd:vms/vm-100-disk-0:conf=/etc/pve/ceph.conf",
        "raw",
        "rbd",
        {"pool": "vms", "image": "vm-100-disk-0", "conf": "/etc/pve/ceph.conf", "user": "admin"},
    )
    spec = DiskSpec("drive-scsi0", Path(vol.path), "raw", vol)
    assert spec.file_node() == {
        "driver": "rbd", "pool": "vms", "image": "vm-100-disk-0",
        "conf": "/etc/pve/ceph.conf", "user": "admin",
    }  # fmt: skip
    name = spec.image_name()
    assert json.loads(name.removeprefix("json:")) == {"file": spec.file_node()}
    spec.check_present()  # a network image: nothing to stat on this node
