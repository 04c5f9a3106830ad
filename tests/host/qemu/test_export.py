"""End-to-end tests of BackupExport with qemu-storage-daemon, qemu-img, qemu-io, libnbd."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import nbd
import pytest

from pvebackup.api.errors import ExternalToolError, NotFoundError, QmpError, UsageError
from pvebackup.api.types import BitmapMode
from pvebackup.host.qemu.export import BackupExport, DiskSpec

if TYPE_CHECKING:
    from conftest import Images, LogRecorder, NbdClient

pytestmark = pytest.mark.e2e
MiB = 1024 * 1024

Connect = Callable[..., "NbdClient"]
B = "pvebackup-st-inc"  # bitmap_name("st", "inc")
NEXT = B + "+next"


class Boom(Exception):
    pass


def export(
    disks: list[DiskSpec],
    log: LogRecorder,
    tmp_path: Path,
    bitmap_id: str | None = "inc",
    **kw: object,
) -> BackupExport:
    return BackupExport(disks, storeid="st", bitmap_id=bitmap_id, log=log, workdir=tmp_path, **kw)  # type: ignore[arg-type]


def scsi0(path: Path, fmt: str = "qcow2") -> list[DiskSpec]:
    return [DiskSpec("drive-scsi0", path, fmt)]


def leftovers(tmp_path: Path) -> list[str]:
    """Our private directories still present under the work dir or the temp dir."""
    import tempfile

    found = []
    for parent in (tmp_path, Path(tempfile.gettempdir())):
        found += [p.name for p in parent.iterdir() if p.name.startswith("pvebackup-")]
    return found


def backup_full(img: Path, log: LogRecorder, tmp_path: Path, connect: Connect) -> None:
    """A successful backup in whatever mode; leaves B holding nothing."""
    with export(scsi0(img), log, tmp_path) as ex:
        c = connect(ex.socket_path, "drive-scsi0")
        c.read(0, 4096)
        c.close()
        ex.commit()


def dirty_now(
    img: Path, log: LogRecorder, tmp_path: Path, connect: Connect
) -> list[tuple[int, int]]:
    """The dirty extents of B as a reuse-mode export reports them (no commit)."""
    with export(scsi0(img), log, tmp_path) as ex:
        assert ex.disks[0].bitmap_mode is BitmapMode.REUSE
        c = connect(ex.socket_path, "drive-scsi0", B)
        ext = c.dirty_extents()
        c.close()
    return ext


def test_full_export_of_two_disks(
    images: Images,
    log: LogRecorder,
    tmp_path: Path,
    nbd_client: Connect,
    assert_gone: Callable[[int], None],
) -> None:
    q = images.create("a.qcow2", 4 * MiB, fill=0x41)
    r = images.create("b.raw", 2 * MiB, fmt="raw", fill=0x42)
    disks = [DiskSpec("drive-scsi0", q, "qcow2"), DiskSpec("drive-virtio1", r, "raw")]
    with export(disks, log, tmp_path, bitmap_id=None) as ex:
        assert [(d.devicename, d.size, d.bitmap_mode, d.bitmap_name) for d in ex.disks] == [
            ("drive-scsi0", 4 * MiB, BitmapMode.NONE, None),
            ("drive-virtio1", 2 * MiB, BitmapMode.NONE, None),
        ]
        assert os.stat(Path(ex.socket_path).parent).st_mode & 0o777 == 0o700
        assert os.stat(ex.fleecing_image("drive-scsi0").parent).st_mode & 0o777 == 0o700
        a = nbd_client(ex.socket_path, "drive-scsi0")
        b = nbd_client(ex.socket_path, "drive-virtio1")
        assert a.size() == 4 * MiB and b.size() == 2 * MiB
        assert a.read(0, 4 * MiB) == images.read(q)
        assert b.read(0, 2 * MiB) == bytes([0x42]) * 2 * MiB
        a.close()
        b.close()
        pid = ex.pid
        ex.commit()
    assert_gone(pid)
    assert leftovers(tmp_path) == []
    assert images.bitmaps(q) == {}
    assert log.at("err") == [] and log.at("warn") == []


def test_new_then_reuse_reads_only_dirty_extents(
    images: Images, log: LogRecorder, tmp_path: Path, nbd_client: Connect
) -> None:
    img = images.create("d.qcow2")
    with export(scsi0(img), log, tmp_path) as ex:
        assert (ex.disks[0].bitmap_mode, ex.disks[0].bitmap_name) == (BitmapMode.NEW, B)
        c = nbd_client(ex.socket_path, "drive-scsi0")
        assert c.read(0, 8 * MiB) == bytes([0x11]) * 8 * MiB  # new: whole disk readable
        c.close()
        ex.commit()
    assert images.bitmaps(img) == {B: frozenset({"auto"})}

    images.write(img, 2 * MiB, 64 * 1024, 0x22)
    images.write(img, 5 * MiB, 128 * 1024, 0x33)
    with export(scsi0(img), log, tmp_path) as ex:
        assert (ex.disks[0].bitmap_mode, ex.disks[0].bitmap_name) == (BitmapMode.REUSE, B)
        c = nbd_client(ex.socket_path, "drive-scsi0", B)
        assert c.dirty_extents() == [(2 * MiB, 64 * 1024), (5 * MiB, 128 * 1024)]
        assert c.read(2 * MiB, 64 * 1024) == bytes([0x22]) * 64 * 1024
        assert c.read(5 * MiB, 128 * 1024) == bytes([0x33]) * 128 * 1024
        with pytest.raises(nbd.Error):
            c.read(0, 4096)  # outside the dirty parts: an error, as the seed says
        c.close()
        ex.commit()
    assert dirty_now(img, log, tmp_path, nbd_client) == []  # nothing written since
    assert log.at("err") == []


def test_new_mode_attaches_the_bitmap_all_dirty(
    images: Images, log: LogRecorder, tmp_path: Path, nbd_client: Connect
) -> None:
    """``qemu:dirty-bitmap:<bitmap_name>`` exists whenever bitmap_name is passed; in
    mode new it says "read everything" (never "nothing changed": an empty bitmap
    would make a provider that trusts it store an empty disk)."""
    size = 8 * MiB + 512  # not a multiple of any bitmap granularity
    img = images.create("d.qcow2", size)
    with export(scsi0(img), log, tmp_path) as ex:
        assert (ex.disks[0].bitmap_mode, ex.disks[0].bitmap_name) == (BitmapMode.NEW, B)
        c = nbd_client(ex.socket_path, "drive-scsi0", B)
        assert c.dirty_extents() == [(0, size)]
        assert c.read(0, size) == images.read(img)  # and it all reads
        c.close()
        ex.commit()
    # Committed: B holds the writes since this backup started, i.e. none.
    assert images.bitmaps(img) == {B: frozenset({"auto"})}
    assert dirty_now(img, log, tmp_path, nbd_client) == []
    assert log.at("err") == []


def test_guest_writes_during_backup_are_not_seen_and_land_in_next(
    images: Images, log: LogRecorder, tmp_path: Path, nbd_client: Connect
) -> None:
    img = images.create("d.qcow2")
    backup_full(img, log, tmp_path, nbd_client)
    images.write(img, 1 * MiB, 1 * MiB, 0x22)  # dirty since the last backup
    with export(scsi0(img), log, tmp_path, guest_writable=True) as ex:
        src = nbd_client(ex.socket_path, "drive-scsi0", B)
        guest = nbd_client(ex.socket_path, ex.guest_export_name("drive-scsi0"))
        guest.write(1 * MiB + 4096, b"\x99" * 8192)  # inside the dirty area
        guest.write(6 * MiB, b"\x77" * 65536)  # outside it
        assert guest.read(6 * MiB, 65536) == b"\x77" * 65536
        assert src.read(1 * MiB, 1 * MiB) == b"\x22" * MiB  # as of backup start
        assert src.dirty_extents() == [(1 * MiB, 1 * MiB)]  # B is frozen
        src.close()
        guest.close()
        ex.commit()
    data = images.read(img)
    assert data[1 * MiB + 4096 : 1 * MiB + 12288] == b"\x99" * 8192
    assert data[6 * MiB : 6 * MiB + 65536] == b"\x77" * 65536
    assert images.bitmaps(img) == {B: frozenset({"auto"})}
    # B now holds exactly the writes since backup start (64 KiB granularity).
    assert dirty_now(img, log, tmp_path, nbd_client) == [(1 * MiB, 65536), (6 * MiB, 65536)]


def test_failed_backup_merges_bitmaps(
    images: Images, log: LogRecorder, tmp_path: Path, nbd_client: Connect
) -> None:
    img = images.create("d.qcow2")
    backup_full(img, log, tmp_path, nbd_client)
    images.write(img, 0, 65536, 0x22)
    with pytest.raises(Boom), export(scsi0(img), log, tmp_path, guest_writable=True) as ex:
        guest = nbd_client(ex.socket_path, ex.guest_export_name("drive-scsi0"))
        guest.write(3 * MiB, b"\x55" * 65536)
        guest.close()
        raise Boom
    assert any("keeps its changes" in m for m in log.at("warn"))
    assert images.bitmaps(img) == {B: frozenset({"auto"})}
    assert dirty_now(img, log, tmp_path, nbd_client) == [(0, 65536), (3 * MiB, 65536)]


def test_failed_new_backup_removes_the_bitmap(
    images: Images, log: LogRecorder, tmp_path: Path
) -> None:
    img = images.create("d.qcow2")
    with pytest.raises(Boom), export(scsi0(img), log, tmp_path) as ex:
        assert ex.disks[0].bitmap_mode is BitmapMode.NEW
        raise Boom
    assert images.bitmaps(img) == {}
    with export(scsi0(img), log, tmp_path) as ex:
        assert ex.disks[0].bitmap_mode is BitmapMode.NEW


def test_in_use_bitmap_after_crash_is_recreated(
    images: Images, log: LogRecorder, tmp_path: Path, nbd_client: Connect
) -> None:
    img = images.create("d.qcow2")
    backup_full(img, log, tmp_path, nbd_client)
    writer = subprocess.Popen(
        ["qemu-io", "-c", "write -P 0x66 0 65536", "-c", "sleep 60000", str(img)],
        stdout=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while "in-use" not in images_bitmaps_shared(img).get(B, ()):
            assert time.monotonic() < deadline, "qemu-io did not open the image"
            time.sleep(0.05)
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait()
    assert "in-use" in images.bitmaps(img)[B]
    with export(scsi0(img), log, tmp_path) as ex:
        assert ex.disks[0].bitmap_mode is BitmapMode.NEW
        c = nbd_client(ex.socket_path, "drive-scsi0")
        assert c.read(0, 8 * MiB) == images_read_shared(img)  # full read possible
        c.close()
        ex.commit()
    assert any("inconsistent" in m and B in m for m in log.at("warn"))
    assert images.bitmaps(img) == {B: frozenset({"auto"})}


def images_bitmaps_shared(img: Path) -> dict[str, list[str]]:
    import json

    out = subprocess.run(
        ["qemu-img", "info", "-U", "--output", "json", str(img)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    bms = json.loads(out).get("format-specific", {}).get("data", {}).get("bitmaps", [])
    return {b["name"]: b["flags"] for b in bms}


def images_read_shared(img: Path) -> bytes:
    out = img.with_suffix(".shared.raw")
    subprocess.run(["qemu-img", "convert", "-U", "-O", "raw", str(img), str(out)], check=True)
    data = out.read_bytes()
    out.unlink()
    return data


def test_raw_image_is_always_none(
    images: Images, log: LogRecorder, tmp_path: Path, nbd_client: Connect
) -> None:
    img = images.create("d.raw", 1 * MiB, fmt="raw", fill=0x12)
    with export(scsi0(img, "raw"), log, tmp_path) as ex:
        assert (ex.disks[0].bitmap_mode, ex.disks[0].bitmap_name) == (BitmapMode.NONE, None)
        c = nbd_client(ex.socket_path, "drive-scsi0")
        assert c.read(0, MiB) == b"\x12" * MiB
        c.close()
        ex.commit()
    assert any("cannot hold a persistent dirty bitmap" in m for m in log.at("info"))


def test_no_bitmap_id_removes_only_our_storage_bitmaps(
    images: Images, log: LogRecorder, tmp_path: Path
) -> None:
    img = images.create("d.qcow2", fill=None)
    for name in (B, NEXT, "pvebackup-st-other", "pvebackup-st2-x", "pvebackup-other-inc", "mine"):
        subprocess.run(["qemu-img", "bitmap", "--add", str(img), name], check=True)
    with export(scsi0(img), log, tmp_path, bitmap_id=None) as ex:
        assert ex.disks[0].bitmap_mode is BitmapMode.NONE
        ex.commit()
    assert set(images.bitmaps(img)) == {"pvebackup-st2-x", "pvebackup-other-inc", "mine"}
    removed = [m for m in log.at("info") if "removing dirty bitmap" in m]
    assert len(removed) == 3


def test_discards_on_the_export_free_fleecing_space(
    images: Images, log: LogRecorder, tmp_path: Path, nbd_client: Connect
) -> None:
    size = 32 * MiB
    img = images.create("d.qcow2", size, fill=0x11)
    with export(scsi0(img), log, tmp_path, bitmap_id=None, guest_writable=True) as ex:
        fleece = ex.fleecing_image("drive-scsi0")
        src = nbd_client(ex.socket_path, "drive-scsi0")
        guest = nbd_client(ex.socket_path, ex.guest_export_name("drive-scsi0"))
        for off in range(0, 16 * MiB, MiB):
            guest.write(off, b"\x22" * MiB)  # copy-before-write fills the fleecing image
        grown = fleece.stat().st_blocks * 512
        assert grown >= 16 * MiB
        for off in range(0, size, 4 * MiB):
            assert src.read(off, 4 * MiB) == b"\x11" * 4 * MiB  # still as of start
            src.trim(off, 4 * MiB)
        src.h.flush()
        shrunk = fleece.stat().st_blocks * 512
        assert shrunk < 2 * MiB < grown
        src.close()
        guest.close()
        ex.commit()
    assert not fleece.exists()
    # The trims reached only the fleecing image, never the disk.
    assert images.read(img) == b"\x22" * 16 * MiB + b"\x11" * 16 * MiB


def test_daemon_killed_midway_cleans_up(
    images: Images,
    log: LogRecorder,
    tmp_path: Path,
    nbd_client: Connect,
    assert_gone: Callable[[int], None],
) -> None:
    img = images.create("d.qcow2")
    backup_full(img, log, tmp_path, nbd_client)
    start = time.monotonic()
    with pytest.raises(nbd.Error), export(scsi0(img), log, tmp_path) as ex:
        pid = ex.pid
        fleece = ex.fleecing_image("drive-scsi0")
        c = nbd_client(ex.socket_path, "drive-scsi0", B)
        os.kill(pid, signal.SIGKILL)
        c.read(0, 4096)
    assert time.monotonic() - start < 15
    assert_gone(pid)
    assert not fleece.exists()
    assert leftovers(tmp_path) == []
    assert any("exited unexpectedly" in m for m in log.at("warn"))
    assert any("left as QEMU left it" in m for m in log.at("warn"))
    # The crash leaves B inconsistent; the next backup notices and reads everything.
    with export(scsi0(img), log, tmp_path) as ex:
        assert ex.disks[0].bitmap_mode is BitmapMode.NEW


def test_daemon_is_not_in_our_session(images: Images, log: LogRecorder, tmp_path: Path) -> None:
    """A terminal's Ctrl-C must reach us only, so that we can finish the bitmaps."""
    img = images.create("d.qcow2", fill=None)
    with export(scsi0(img), log, tmp_path) as ex:
        assert os.getsid(ex.pid) != os.getsid(0)


def test_missing_image_is_a_typed_error(images: Images, log: LogRecorder, tmp_path: Path) -> None:
    good = images.create("d.qcow2", fill=None)
    disks = [
        DiskSpec("drive-scsi0", good, "qcow2"),
        DiskSpec("drive-scsi1", images.root / "gone.qcow2", "qcow2"),
    ]
    with (
        pytest.raises(NotFoundError, match="drive-scsi1.*gone.qcow2"),
        export(disks, log, tmp_path),
    ):
        pass
    assert leftovers(tmp_path) == []
    assert images.bitmaps(good) == {}


def test_setup_failure_after_daemon_start_tears_down(
    images: Images, log: LogRecorder, tmp_path: Path, assert_gone: Callable[[int], None]
) -> None:
    img = images.create("d.qcow2", fill=None)
    # The same image twice: the second open fails on QEMU's image lock.
    disks = [DiskSpec("drive-scsi0", img, "qcow2"), DiskSpec("drive-scsi1", img, "qcow2")]
    ex = export(disks, log, tmp_path)
    with pytest.raises(QmpError, match="blockdev-add"), ex:
        pass
    assert_gone(ex.pid)
    assert leftovers(tmp_path) == []
    assert images.bitmaps(img) == {}


def test_wrong_format_and_bad_arguments(images: Images, log: LogRecorder, tmp_path: Path) -> None:
    raw = images.create("d.raw", MiB, fmt="raw", fill=None)
    with pytest.raises(ExternalToolError, match="qcow2"), export(scsi0(raw), log, tmp_path):
        pass
    with pytest.raises(UsageError):
        export(scsi0(raw, "vmdk"), log, tmp_path)
    with pytest.raises(UsageError):
        export([], log, tmp_path)
    with pytest.raises(UsageError):
        export(scsi0(raw, "raw") * 2, log, tmp_path)
    ex = export(scsi0(raw, "raw"), log, tmp_path)
    with pytest.raises(UsageError):
        ex.guest_export_name("drive-scsi0")
    assert leftovers(tmp_path) == []


def test_sigterm_turned_into_an_exception_tears_down(
    images: Images,
    log: LogRecorder,
    tmp_path: Path,
    nbd_client: Connect,
    assert_gone: Callable[[int], None],
) -> None:
    """The job runner turns SIGTERM into an exception; __exit__ does the rest."""
    img = images.create("d.qcow2")
    backup_full(img, log, tmp_path, nbd_client)
    images.write(img, 0, 65536, 0x22)

    def on_term(signum: int, frame: object) -> None:
        raise Boom

    old = signal.signal(signal.SIGTERM, on_term)
    try:
        with pytest.raises(Boom), export(scsi0(img), log, tmp_path, guest_writable=True) as ex:
            pid = ex.pid
            guest = nbd_client(ex.socket_path, ex.guest_export_name("drive-scsi0"))
            guest.write(7 * MiB, b"\x44" * 4096)
            src = nbd_client(ex.socket_path, "drive-scsi0", B)
            src.read(0, 65536)  # the provider is mid-read, still connected
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(10)  # never finishes: the handler raises
    finally:
        signal.signal(signal.SIGTERM, old)
    assert_gone(pid)
    assert leftovers(tmp_path) == []
    assert log.at("err") == []
    assert dirty_now(img, log, tmp_path, nbd_client) == [(0, 65536), (7 * MiB, 65536)]


def test_a_failing_cleanup_step_is_logged_and_the_rest_still_runs(
    images: Images,
    log: LogRecorder,
    tmp_path: Path,
    nbd_client: Connect,
    assert_gone: Callable[[int], None],
) -> None:
    img = images.create("d.qcow2")
    backup_full(img, log, tmp_path, nbd_client)
    images.write(img, 0, 65536, 0x22)
    with export(scsi0(img), log, tmp_path) as ex:
        pid = ex.pid
        # Someone removed the export behind our back: its removal at exit fails.
        ex._daemon.execute("block-export-del", id="pvb-export0")  # type: ignore[union-attr]
        ex.commit()
    [err] = log.at("err")
    assert "remove export pvb-export0" in err and "block-export-del" in err
    assert_gone(pid)
    assert leftovers(tmp_path) == []
    assert dirty_now(img, log, tmp_path, nbd_client) == []  # commit still took effect
