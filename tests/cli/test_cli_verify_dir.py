"""``pvebackup verify`` on a backup-dir: recorded checksums and qemu-img check, per volume."""

from __future__ import annotations

import hashlib
import json
import struct
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from pvebackup.api.types import GuestType
from pvebackup.cli.main import main
from pvebackup.providers.directory.volumes import BackupIndex, DeviceEntry, VolumeName

pytestmark = pytest.mark.e2e

MIB = 1024 * 1024
DEVICE = "drive-scsi0"
T0 = 1_700_000_000


def _cross_link(image: Path) -> None:
    """Hostile input: guest cluster 1 mapped onto cluster 0's host cluster (refcount 1,
    referenced twice): the image still opens, ``qemu-img check`` counts a corruption."""
    raw = bytearray(image.read_bytes())
    (l1,) = struct.unpack(">Q", raw[40:48])
    (l2,) = struct.unpack(">Q", raw[l1 : l1 + 8])
    l2 &= 0x00FF_FFFF_FFFF_FE00
    raw[l2 + 8 : l2 + 16] = raw[l2 : l2 + 8]
    image.write_bytes(bytes(raw))


def _volume(
    store: Path,
    ctime: int,
    *,
    vmtype: GuestType = GuestType.QEMU,
    damage: Callable[[Path], None] | None = None,
) -> tuple[str, Path]:
    """A committed volume as the provider writes it: image, and index.json pinning it."""
    name = VolumeName(vmtype, 100, ctime)
    directory = store / "backup" / name.dirname
    directory.mkdir(parents=True)
    devices = {}
    image = directory / f"{DEVICE}.qcow2"
    if vmtype == GuestType.QEMU:
        subprocess.run(
            ["qemu-img", "create", "-q", "-f", "qcow2", str(image), str(MIB)], check=True
        )
        subprocess.run(
            ["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 256k", str(image)],
            check=True,
            capture_output=True,
        )
        if damage is not None:
            damage(image)  # damaged before its checksum is recorded
        data = image.read_bytes()
        devices[DEVICE] = DeviceEntry(
            size=MIB,
            file=image.name,
            image_size=len(data),
            image_sha256=hashlib.sha256(data).hexdigest(),
        )
    index = BackupIndex(
        vmid=100,
        vmtype=vmtype,
        ctime=ctime,
        devices=devices,
        ct_format=None if vmtype == GuestType.QEMU else "tar",
    )
    (directory / "index.json").write_text(index.to_json())
    return str(name), image


def _node(tmp_path: Path) -> Path:
    root = tmp_path / "node"
    (root / "etc" / "pve").mkdir(parents=True)
    (root / "etc" / "pve" / "storage.cfg").write_text(f"backup-dir: bd\n\tpath {tmp_path / 'bd'}\n")
    return root


def test_verify_dir_clean_then_a_flipped_image_byte_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = _node(tmp_path)
    good, _ = _volume(tmp_path / "bd", T0)
    bad, image = _volume(tmp_path / "bd", T0 + 60)
    ct, _ = _volume(tmp_path / "bd", T0 + 120, vmtype=GuestType.LXC)
    assert main(["--root", str(root), "verify", "bd"]) == 0
    out = capsys.readouterr().out
    assert f"ok      {good}" in out and f"ok      {bad}" in out and f"skipped {ct}" in out
    # Hostile input: one byte of guest data flipped in the stored image.
    raw = bytearray(image.read_bytes())
    cluster = raw.index(b"\x5a" * 4096)
    raw[cluster + 100] ^= 0xFF
    image.write_bytes(bytes(raw))
    assert main(["--root", str(root), "verify", "bd"]) == 5
    out = capsys.readouterr().out
    assert f"ok      {good}" in out and f"failed  {bad}" in out
    assert "differs from the checksum recorded" in out and "1 FAILED" in out
    assert main(["--root", str(root), "verify", f"bd:{good}"]) == 0


def test_verify_dir_missing_image_and_symlink_fail(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = _node(tmp_path)
    gone, image = _volume(tmp_path / "bd", T0)
    image.unlink()
    linked, image2 = _volume(tmp_path / "bd", T0 + 60)
    secret = tmp_path / "secret.qcow2"
    image2.rename(secret)
    image2.symlink_to(secret)  # hostile: a symlink where the image belongs
    code = main(["--root", str(root), "verify", "bd", "--output", "json"])
    assert code == 5
    doc = json.loads(capsys.readouterr().out)
    states = {s["volid"]: s for s in doc["snapshots"]}
    assert doc["ok"] is False and doc["chunks"] is None
    assert states[f"bd:{gone}"]["state"] == "failed"
    assert "lacks its image" in states[f"bd:{gone}"]["errors"][0]
    assert states[f"bd:{linked}"]["state"] == "failed"


def test_verify_dir_unknown_volume_exits_3(tmp_path: Path) -> None:
    root = _node(tmp_path)
    _volume(tmp_path / "bd", T0)
    assert main(["--root", str(root), "verify", "bd:backup/vm-100-2020-01-01T00:00:00Z"]) == 3
    assert main(["--root", str(root), "verify", "bd:../x"]) == 3


def test_verify_dir_names_an_image_qemu_img_check_finds_corrupt(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = _node(tmp_path)
    bad, _ = _volume(tmp_path / "bd", T0, damage=_cross_link)
    assert main(["--root", str(root), "verify", f"bd:{bad}"]) == 5
    out = capsys.readouterr().out
    assert f"failed  {bad}" in out and "qemu-img check found 1 corruptions" in out
    assert "differs from the checksum" not in out  # the checksum matched: qemu-img found it
