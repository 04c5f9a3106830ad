"""backup-store: container archives (a PAX tar stream, content-defined chunks)."""

from __future__ import annotations

import os
import stat
import tarfile
import threading
import time
from pathlib import Path

import pytest
from bstore_support import FakeHost

from pvebackup.api.errors import CorruptChunkError
from pvebackup.api.types import BackupMechanism, GuestType, RestoreMechanism
from pvebackup.providers.store.ctarchive import ARCHIVE_DEVICE
from pvebackup.providers.store.provider import BackupStoreProvider
from pvebackup.store.pack import pack_key

pytestmark = pytest.mark.e2e


def _tree(root: Path) -> Path:
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "hostname").write_text("ct101\n")
    (root / "big").write_bytes(os.urandom(300 * 1024))  # several 64 KiB chunks
    os.link(root / "big", root / "big-link")
    os.symlink("etc/hostname", root / "name")
    os.mkfifo(root / "fifo")
    (root / "skipme").write_text("excluded\n")
    os.utime(root / "etc" / "hostname", ns=(1, 1_600_000_000_123_456_789))
    return root


def _backup(host: FakeHost, root: Path, vmid: int = 101) -> tuple[str, BackupStoreProvider]:
    p = host.provider()
    p.job_start(int(time.time()))
    p.backup_start(vmid, GuestType.LXC)
    mech, bitmap = p.backup_get_mechanism(vmid, GuestType.LXC)
    assert (mech, bitmap) == (BackupMechanism.DIRECTORY, None)
    volname = p.backup_get_target(vmid, GuestType.LXC)
    p.backup_guest_config(vmid, str(host.conf))
    id_map = [["u", "0", "100000", "65536"], ["g", "0", "100000", "65536"]]
    p.backup_directory(vmid, str(root), id_map, ["/skipme"], ["."], None)
    p.backup_end(vmid)
    p.job_end()
    return volname, p


def _read_fifo(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def test_ct_round_trip_through_a_fifo(host: FakeHost, tmp_path: Path) -> None:
    root = _tree(tmp_path / "ct")
    for p in root.rglob("*"):
        os.lchown(p, 100000 + 5, 100000 + 7)
    volname, p = _backup(host, root)
    snap = p.store().open_snapshot(p.store().list_snapshots()[0])
    # headers, then the big file's data on its own chunk(s), then the rest
    assert len(snap.open_index(ARCHIVE_DEVICE)) >= 3
    assert p.restore_get_mechanism(volname, host.storeid) == (
        RestoreMechanism.TAR, GuestType.LXC)  # fmt: skip
    path = p.restore_tar_init(volname, host.storeid)
    # a pipe, not a spooled copy: nothing large lands on disk
    assert stat.S_ISFIFO(os.stat(path).st_mode)
    data = _read_fifo(path)
    p.restore_tar_cleanup(volname, host.storeid)
    assert not os.path.exists(os.path.dirname(path))
    out = tmp_path / "archive.tar"
    out.write_bytes(data)
    with tarfile.open(out) as tar:
        members = {m.name: m for m in tar.getmembers()}
        assert "./skipme" not in members
        big = tar.extractfile("./big")
        assert big is not None and big.read() == (root / "big").read_bytes()
        assert members["./big-link"].islnk() and members["./big-link"].linkname == "./big"
        assert members["./name"].issym() and members["./name"].linkname == "etc/hostname"
        assert members["./fifo"].isfifo()
        host_ = members["./etc/hostname"]
        assert (host_.uid, host_.gid) == (5, 7)  # container ids, not host ids
        assert host_.pax_headers["mtime"] == "1600000000.123456789"


def test_ct_corrupt_chunk_fails_the_restore(host: FakeHost, tmp_path: Path) -> None:
    volname, p = _backup(host, _tree(tmp_path / "ct"))
    store = p.store()
    index = store.open_snapshot(store.list_snapshots()[0]).open_index(ARCHIVE_DEVICE)
    victim = index.digest(1)  # the big file's data
    loc = store.locate_chunk(victim)
    assert loc is not None
    pack = tmp_path / "store" / pack_key(loc.pack)
    raw = bytearray(pack.read_bytes())
    raw[loc.offset + loc.length - 1] ^= 0x01
    pack.write_bytes(bytes(raw))
    fresh = host.provider()  # no cached chunk in memory
    path = fresh.restore_tar_init(volname, host.storeid)
    data = _read_fifo(path)
    assert len(data) < index.size  # the stream stops at the damaged chunk
    with pytest.raises(CorruptChunkError) as failed:
        fresh.restore_tar_cleanup(volname, host.storeid)
    assert victim.hex() in str(failed.value) and failed.value.exit_code == 5


def test_ct_cleanup_without_a_reader_does_not_hang(host: FakeHost, tmp_path: Path) -> None:
    volname, p = _backup(host, _tree(tmp_path / "ct"))
    path = p.restore_tar_init(volname, host.storeid)
    done = threading.Event()

    def cleanup() -> None:
        p.restore_tar_cleanup(volname, host.storeid)
        done.set()

    threading.Thread(target=cleanup, daemon=True).start()
    assert done.wait(20), "restore_tar_cleanup blocked on a FIFO nobody reads"
    assert not os.path.exists(path)


def test_ct_backup_leaves_the_vm_incremental_base_alone(host: FakeHost, tmp_path: Path) -> None:
    _, p = _backup(host, _tree(tmp_path / "ct"), vmid=101)
    # A container snapshot is no dirty-bitmap base: nothing may be recorded for it.
    assert not any("101" in f.name for f in p.hoststate.dir.rglob("*") if f.is_file())
