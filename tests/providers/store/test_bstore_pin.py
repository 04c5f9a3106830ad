"""A backup-store backup pins its bitmap base from backup_get_mechanism to its end."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from bstore_support import FakeHost, mixed_image

from pvebackup.api.errors import VolumeInUseError
from pvebackup.api.types import BitmapMode, GuestType
from pvebackup.store.snapshot import SnapshotId

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("end", ["abort", "end"])
def test_the_base_is_pinned_while_the_backup_runs(
    host: FakeHost, tmp_path: Path, end: str
) -> None:
    src = mixed_image(tmp_path / "src.qcow2")
    base, _ = host.backup(src, BitmapMode.NEW, expect_bitmap=True)
    prefix = SnapshotId.from_volname(base).prefix
    p = host.provider()
    p.job_start(int(time.time()))
    p.backup_start(100, GuestType.QEMU)
    _, bitmap = p.backup_get_mechanism(100, GuestType.QEMU)
    assert bitmap is not None
    # Seen by another process or host: it reads the session objects in the store.
    other = host.provider().store()
    assert prefix in other.pinned_snapshots()
    with pytest.raises(VolumeInUseError, match="base of a running backup"):
        host.plugin.free_volume(host.scfg, host.storeid, base)
    if end == "abort":
        p.backup_abort(100, "stopped")
    else:
        p.backup_guest_config(100, str(host.conf))
        p.backup_end(100)
    assert prefix not in other.pinned_snapshots()
    p.job_end()
    host.plugin.free_volume(host.scfg, host.storeid, base)
