"""The backup export of a VM's disks: unchanging NBD exports with real QEMU.

Per disk, inside one ``qemu-storage-daemon`` (see docs/design.md, "host-qemu")::

    NBD export <devicename> (writable, bitmap B attached in modes new and reuse)
      -> snapshot-access  pvb-snap<i>
           -> copy-before-write  pvb-cbw<i>   (bitmap: B in mode reuse)
                file   -> pvb-disk<i>    the image (qcow2 or raw)
                target -> pvb-fleece<i>  a temporary qcow2, discard: unmap

The copy-before-write filter copies every block the guest overwrites into the
fleecing image first, so the export keeps showing the disk as of backup start.
The export is writable only so that the provider's discards (trims) reach the
fleecing image and free its space; they never touch the disk.

Bitmaps (see :mod:`.bitmaps` for the mode decision): at backup start one QMP
transaction per disk freezes B (``reuse``) or creates it empty and disabled
(``new``) and creates ``B+next``, which records the writes made from then on.
At the end, after :meth:`BackupExport.commit`, B becomes ``B+next`` (exactly the
writes since backup start); without commit, ``B+next`` is merged into B (reuse:
nothing lost) or B is removed (new: the next backup is again a full one).

``qemu:dirty-bitmap:B`` is available on the export whenever the provider gets a
``bitmap_name`` (modes new and reuse), so one code path can read "the dirty
extents" in both. In mode new everything must be read, so B is made *all dirty*
first (as Proxmox VE's QEMU does with ``bdrv_set_dirty_bitmap`` for a new
bitmap). QMP has no command for that; we make it from outside: a throw-away
``null-co`` node of the disk's size with a non-persistent bitmap of the largest
granularity (2 GiB), an NBD export of it, write-zeroes over its whole length
(null-co stores nothing; each request only dirties the bitmap), then a merge of
that bitmap into B (QEMU merges across nodes and granularities when the sizes
match). It costs about 10 s per TiB of disk and no I/O. B is disabled, so what
it holds never changes during the backup; at commit it is cleared as always.
"""

from __future__ import annotations

import os
import shutil
import stat
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from pvebackup.api.errors import NotFoundError, QmpError, UsageError
from pvebackup.api.types import BitmapMode, LogFunction, LogLevel
from pvebackup.kit import qemuimg
from pvebackup.kit.nbdsource import write_zeroes
from pvebackup.kit.proc import private_dir
from pvebackup.storage.guestvol import GuestVolume

from .bitmaps import BitmapPlan, plan_bitmap
from .daemon import StorageDaemon
from .fleecing import FleecingVolumes
from .qmp import QmpConnectionError

__all__ = ["BackupExport", "DiskSpec", "ExportedDisk"]

_FORMATS = ("qcow2", "raw")
_EXPORT_GONE_TIMEOUT = 10.0
_ALL_GRANULARITY = 1 << 31  # QEMU's largest: fewest bits to set


@dataclass(frozen=True)
class DiskSpec:
    """One disk to back up.

    ``volume`` is the storage's answer for a storage volume (an rbd image, an LV);
    without it ``path`` is opened as a file, or as a host device when it is a
    block device (a passthrough disk, ``scsi0: /dev/sdg``).
    """

    devicename: str  # "drive-scsi0": also the NBD export name
    path: Path  # the image file or device
    format: str  # "qcow2" or "raw"
    volume: GuestVolume | None = None

    def file_node(self) -> dict[str, Any]:
        """The protocol node's blockdev options (QEMU's ``file`` driver refuses devices)."""
        if self.volume is not None:
            return self.volume.file_node()
        driver = "host_device" if _is_block_device(self.path) else "file"
        return {"driver": driver, "filename": str(self.path)}

    def image_name(self) -> str:
        """What ``qemu-img`` opens: the path, or a ``json:`` name pinning the protocol."""
        return self.volume.qemu_name() if self.volume is not None else str(self.path)

    def check_present(self) -> None:
        """:raises NotFoundError: no image file or block device at the path."""
        if self.volume is not None and self.volume.protocol not in ("file", "host_device"):
            return  # a network image: the daemon's open says whether it exists
        if not (self.path.is_file() or _is_block_device(self.path)):
            raise NotFoundError(f"{self.devicename}: disk image {self.path} does not exist")


def _is_block_device(path: Path) -> bool:
    try:
        return stat.S_ISBLK(os.stat(path).st_mode)
    except OSError:
        return False


@dataclass(frozen=True)
class ExportedDisk:
    """One exported disk, as the provider's ``backup_nbd`` needs it."""

    devicename: str
    size: int  # virtual size in bytes
    bitmap_mode: BitmapMode  # none/new/reuse, decided per disk
    bitmap_name: str | None  # B in modes new and reuse


@dataclass
class _Disk:
    index: int
    spec: DiskSpec
    size: int
    plan: BitmapPlan
    fleece_path: Path
    disk_node: str = ""  # the image's node: ours (pvb-disk<i>) or the running VM's
    filter_file: str = ""  # what the copy-before-write filter filters (default: disk_node)
    nodes: list[str] = field(default_factory=list)  # added, in order
    exports: list[str] = field(default_factory=list)
    bitmaps_started: bool = False

    def __post_init__(self) -> None:
        if not self.disk_node:
            self.disk_node = f"pvb-disk{self.index}"
        if not self.filter_file:
            self.filter_file = self.disk_node


class BackupExport:
    """Export ``disks`` as unchanging NBD exports for one guest backup.

    A context manager: ``__enter__`` builds everything (and on any failure tears
    down what exists and raises), ``__exit__`` always tears everything down:
    exports, nodes, the daemon, the fleecing images, the temporary directories.

    :param storeid: the backup storage; part of the bitmap names.
    :param bitmap_id: the provider's bitmap id, or None for no bitmap.
    :param log: the task log, ``log(level, message)``.
    :param workdir: where the private directories (fleecing images, and sockets
        when the path is short enough) are made; default: the system temporary
        directory. Fleecing images grow with guest writes.
    :param fleecing: allocates the fleecing images on a storage (``--fleecing
        storage=ID``); default: qcow2 files in a private directory under ``workdir``.
    :param guest_writable: also export each copy-before-write node writable under
        :meth:`guest_export_name`: writes there are what a running guest's writes
        would be (tests use it; a real VM writes through QEMU instead).
    """

    def __init__(
        self,
        disks: Sequence[DiskSpec],
        *,
        storeid: str,
        bitmap_id: str | None,
        log: LogFunction,
        workdir: Path | None = None,
        guest_writable: bool = False,
        fleecing: FleecingVolumes | None = None,
    ) -> None:
        if not disks:
            raise UsageError("no disks to export")
        names = [d.devicename for d in disks]
        if len(set(names)) != len(names):
            raise UsageError(f"duplicate device names in {names}")
        for d in disks:
            if d.format not in _FORMATS:
                raise UsageError(f"{d.devicename}: unsupported image format {d.format!r}")
        self._specs = list(disks)
        self.storeid = storeid
        self.bitmap_id = bitmap_id
        self._log = log
        self._workdir = workdir
        self._fleecing = fleecing
        self._guest_writable = guest_writable
        self._daemon: StorageDaemon | None = None
        self._fleece_dir: Path | None = None
        self._disks: list[_Disk] = []
        self._nbd_started = False
        self._committed = False
        self._entered = False
        self.socket_path = ""
        self.disks: list[ExportedDisk] = []

    # -- public ------------------------------------------------------------------

    @property
    def pid(self) -> int:
        """The qemu-storage-daemon's process id."""
        if self._daemon is None:
            raise RuntimeError("export is not set up")
        return self._daemon.pid

    def guest_export_name(self, devicename: str) -> str:
        """Name of the writable export that plays the guest of ``devicename``."""
        if not self._guest_writable:
            raise UsageError("guest exports exist only with guest_writable=True")
        if devicename not in {d.devicename for d in self._specs}:
            raise UsageError(f"no disk {devicename!r} in this export")
        return f"{devicename}-guest"

    def fleecing_image(self, devicename: str) -> Path:
        """The fleecing image of ``devicename`` (for diagnostics and tests)."""
        for d in self._disks:
            if d.spec.devicename == devicename:
                return d.fleece_path
        raise UsageError(f"no disk {devicename!r} in this export")

    def commit(self) -> None:
        """Mark the whole guest backup as successful (bitmaps advance on exit)."""
        if not self._entered:
            raise RuntimeError("commit() outside the export's context")
        self._committed = True

    def __enter__(self) -> BackupExport:
        if self._entered:
            raise RuntimeError("BackupExport can be entered once")
        self._entered = True
        try:
            self._setup()
        except BaseException:
            self._teardown()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # An exception after commit() keeps the commit: the backup was stored.
        self._teardown()

    # -- set-up ------------------------------------------------------------------

    def _setup(self) -> None:
        runtime_dir = self._start_backend()
        plans = self._inspect()
        if self._fleecing is None:
            # private_dir: recorded in the guest's run state before it exists.
            self._fleece_dir = private_dir("pvebackup-fleece-", self._workdir)
        for i, (spec, (size, plan)) in enumerate(zip(self._specs, plans, strict=True)):
            fleece = (self._fleece_dir or Path()) / f"fleece{i}.qcow2"  # or set when allocated
            self._disks.append(
                _Disk(i, spec, size, plan, fleece, self._disk_node_of(i), self._filter_file_of(i))
            )
        self._changed()
        for d in self._disks:
            self._add_nodes(d)
        self._switch_views()

        sock = runtime_dir / "nbd.sock"
        self._qmp("nbd-server-start", addr={"type": "unix", "data": {"path": str(sock)}})
        self._nbd_started = True
        self._changed()
        self.socket_path = str(sock)
        for d in self._disks:
            if d.plan.mode is BitmapMode.NEW:
                self._mark_all_dirty(d)
        for d in self._disks:
            self._add_exports(d)
        self.disks = [
            ExportedDisk(d.spec.devicename, d.size, d.plan.mode, d.plan.name) for d in self._disks
        ]
        for e in self.disks:
            self._log(
                LogLevel.INFO,
                f"{e.devicename}: exported {e.size} bytes, bitmap mode {e.bitmap_mode}"
                + (f" ({e.bitmap_name})" if e.bitmap_name else ""),
            )

    # Hooks: a qemu-storage-daemon of our own here; a running VM's QEMU in .live.

    def _start_backend(self) -> Path:
        """Start the daemon; return the private directory for the NBD socket."""
        self._daemon = StorageDaemon(runtime_parent=self._workdir).start()
        return self._daemon.runtime_dir

    def _disk_node_of(self, index: int) -> str:
        return f"pvb-disk{index}"

    def _filter_file_of(self, index: int) -> str:
        return self._disk_node_of(index)

    def _switch_views(self) -> None:
        """Freeze the bitmaps and put the filters in place: the backup's instant."""
        for d in self._disks:
            self._start_bitmaps(d)
        for d in self._disks:
            self._add_filters(d)

    def _changed(self) -> None:
        """Called after each change of the node graph (the live export records it)."""

    def _before_node_del(self, d: _Disk, node: str) -> None:
        """Called in teardown before ``node`` of ``d`` is removed."""

    def _inspect(self) -> list[tuple[int, BitmapPlan]]:
        """Check every image, decide bitmaps, remove stale ones (no daemon yet)."""
        plans: list[tuple[int, BitmapPlan]] = []
        for spec in self._specs:
            spec.check_present()
            info = qemuimg.info(Path(spec.image_name()), fmt=spec.format)
            plan = plan_bitmap(
                info,
                devicename=spec.devicename,
                storeid=self.storeid,
                bitmap_id=self.bitmap_id,
                log=self._log,
            )
            plans.append((info.virtual_size, plan))
        for spec, (_, plan) in zip(self._specs, plans, strict=True):
            for name in plan.remove:
                self._remove_bitmap(spec, name)
        return plans

    def _add_nodes(self, d: _Disk) -> None:
        self._qmp(
            "blockdev-add",
            driver=d.spec.format,
            **{"node-name": d.disk_node},
            file=d.spec.file_node(),
        )
        d.nodes.append(d.disk_node)
        self._add_fleece(d)

    def _add_fleece(self, d: _Disk) -> None:
        i = d.index
        if self._fleecing is not None:
            volume, node = self._fleecing.allocate(d.size)
            d.fleece_path = Path(volume.path)
            self._qmp("blockdev-add", **node, **{"node-name": f"pvb-fleece{i}"})
        else:
            qemuimg.create(d.fleece_path, d.size, fmt="qcow2")
            self._qmp(
                "blockdev-add",
                driver="qcow2",
                discard="unmap",
                **{"node-name": f"pvb-fleece{i}"},
                file={"driver": "file", "filename": str(d.fleece_path), "discard": "unmap"},
            )
        d.nodes.append(f"pvb-fleece{i}")
        self._changed()

    def _start_bitmaps(self, d: _Disk) -> None:
        plan = d.plan
        if plan.mode is BitmapMode.NONE:
            return
        assert plan.name is not None and plan.next_name is not None
        node = d.disk_node
        actions: list[dict[str, Any]] = []
        if plan.mode is BitmapMode.NEW:
            actions.append(
                _action(
                    "block-dirty-bitmap-add",
                    node=node,
                    name=plan.name,
                    persistent=True,
                    disabled=True,
                )
            )
        else:
            actions.append(_action("block-dirty-bitmap-disable", node=node, name=plan.name))
        actions.append(
            _action("block-dirty-bitmap-add", node=node, name=plan.next_name, persistent=True)
        )
        self._qmp("transaction", actions=actions)
        d.bitmaps_started = True
        self._changed()

    def _add_filters(self, d: _Disk) -> None:
        i = d.index
        cbw: dict[str, Any] = {
            "driver": "copy-before-write",
            "node-name": f"pvb-cbw{i}",
            "file": d.filter_file,
            "target": f"pvb-fleece{i}",
        }
        if d.plan.mode is BitmapMode.REUSE:
            cbw["bitmap"] = {"node": d.disk_node, "name": d.plan.name}
        self._qmp("blockdev-add", **cbw)
        d.nodes.append(f"pvb-cbw{i}")
        self._changed()
        self._insert_filter(d)
        self._qmp(
            "blockdev-add",
            driver="snapshot-access",
            file=f"pvb-cbw{i}",
            # QEMU drops discards on nodes not opened with discard=unmap.
            discard="unmap",
            **{"node-name": f"pvb-snap{i}"},
        )
        d.nodes.append(f"pvb-snap{i}")
        self._changed()

    def _insert_filter(self, d: _Disk) -> None:
        """Put the filter above the image's users (nothing to do in our own daemon)."""

    def _add_exports(self, d: _Disk) -> None:
        i = d.index
        args: dict[str, Any] = {
            "type": "nbd",
            "id": f"pvb-export{i}",
            "node-name": f"pvb-snap{i}",
            "name": d.spec.devicename,
            "writable": True,
        }
        if d.plan.mode is not BitmapMode.NONE:
            # New: B is all dirty (_mark_all_dirty); reuse: B holds the changes.
            args["bitmaps"] = [{"node": d.disk_node, "name": d.plan.name}]
        self._qmp("block-export-add", **args)
        d.exports.append(f"pvb-export{i}")
        self._changed()
        if self._guest_writable:
            self._qmp(
                "block-export-add",
                type="nbd",
                id=f"pvb-guest{i}",
                name=self.guest_export_name(d.spec.devicename),
                writable=True,
                **{"node-name": f"pvb-cbw{i}"},
            )
            d.exports.append(f"pvb-guest{i}")

    def _mark_all_dirty(self, d: _Disk) -> None:
        """Make the (new, disabled, empty) bitmap B of ``d`` report every byte dirty."""
        node = export_id = f"pvb-all{d.index}"
        self._qmp("blockdev-add", driver="null-co", size=d.size, **{"node-name": node})
        d.nodes.append(node)  # removed by the teardown should anything below fail
        self._qmp(
            "block-dirty-bitmap-add", node=node, name="all", granularity=_ALL_GRANULARITY,
            persistent=False,
        )
        self._qmp(
            "block-export-add", type="nbd", id=export_id, name=export_id, writable=True,
            **{"node-name": node},
        )
        try:
            write_zeroes(self.socket_path, export_id, d.size)
        finally:
            self._qmp("block-export-del", id=export_id, mode="hard")
            self._wait_exports_gone([export_id])
        self._qmp(
            "block-dirty-bitmap-merge", node=d.disk_node, target=d.plan.name,
            bitmaps=[{"node": node, "name": "all"}],
        )
        self._qmp("blockdev-del", **{"node-name": node})
        d.nodes.remove(node)

    def _qmp(self, cmd: str, /, **args: Any) -> Any:
        assert self._daemon is not None
        return self._daemon.execute(cmd, **args)

    def _remove_bitmap(self, spec: DiskSpec, name: str) -> None:
        qemuimg.bitmap_remove(Path(spec.image_name()), name)

    # -- teardown ----------------------------------------------------------------

    def _teardown(self) -> None:
        """Remove everything; never hangs, never leaves the daemon running."""
        daemon = self._daemon
        try:
            if daemon is not None:
                if daemon.alive and daemon.qmp.connected:
                    try:
                        self._teardown_qmp()
                    except QmpConnectionError as exc:
                        self._log(LogLevel.ERR, f"cleanup: {exc}")
                        self._log_daemon_lost(daemon)
                    except QmpError as exc:
                        self._log(LogLevel.ERR, f"cleanup: {exc}")
                else:
                    self._log_daemon_lost(daemon)
        finally:
            try:
                if daemon is not None:
                    daemon.stop()
            finally:
                self._free_fleecing()

    def _free_fleecing(self) -> None:
        """Remove the fleecing images (their nodes are gone, or QEMU is)."""
        if self._fleece_dir is not None:
            shutil.rmtree(self._fleece_dir, ignore_errors=True)
        if self._fleecing is not None:
            self._fleecing.free_all()

    def _log_daemon_lost(self, daemon: StorageDaemon) -> None:
        deadline = time.monotonic() + 1.0
        while daemon.alive and time.monotonic() < deadline:
            time.sleep(0.02)
        if daemon.alive:
            self._log(LogLevel.WARN, f"qemu-storage-daemon (pid {daemon.pid}) stopped answering")
        else:
            self._log(
                LogLevel.WARN,
                f"qemu-storage-daemon (pid {daemon.pid}) exited unexpectedly"
                f" (status {daemon.returncode}): {daemon.log_tail(500) or 'no output'}",
            )
        self._log_bitmaps_unknown()

    def _log_bitmaps_unknown(self) -> None:
        for d in self._disks:
            if d.bitmaps_started:
                self._log(
                    LogLevel.WARN,
                    f"{d.spec.devicename}: dirty bitmap {d.plan.name} left as QEMU left it;"
                    " the next backup checks it and reads the whole disk if it is inconsistent",
                )

    def _try(self, what: str, cmd: str, /, **args: Any) -> bool:
        """Run a teardown command; log a QMP error and go on (connection loss raises)."""
        try:
            self._qmp(cmd, **args)
            return True
        except QmpConnectionError:
            raise
        except QmpError as exc:
            self._log(LogLevel.ERR, f"cleanup: {what}: {exc}")
            return False

    def _teardown_qmp(self) -> None:
        ids = [e for d in self._disks for e in d.exports]
        for export_id in ids:
            self._try(f"remove export {export_id}", "block-export-del", id=export_id, mode="hard")
        self._wait_exports_gone(ids)
        if self._nbd_started:
            self._try("stop NBD server", "nbd-server-stop")
        for d in self._disks:
            for node in reversed(d.nodes):
                if node != d.disk_node:
                    self._before_node_del(d, node)
                    self._try(f"remove node {node}", "blockdev-del", **{"node-name": node})
        for d in self._disks:
            if d.bitmaps_started:
                self._finish_bitmaps(d)
            if d.disk_node in d.nodes:
                # Closing the image stores its persistent bitmaps.
                self._try(f"close {d.spec.path}", "blockdev-del", **{"node-name": d.disk_node})

    def _wait_exports_gone(self, ids: list[str]) -> None:
        deadline = time.monotonic() + _EXPORT_GONE_TIMEOUT
        while ids:
            present = {e.get("id") for e in self._qmp("query-block-exports")}
            if not present.intersection(ids):
                return
            if time.monotonic() > deadline:
                self._log(LogLevel.ERR, f"cleanup: exports still present: {sorted(present)}")
                return
            time.sleep(0.05)

    def _finish_bitmaps(self, d: _Disk) -> None:
        name, nxt, node = d.plan.name, d.plan.next_name, d.disk_node
        dev = d.spec.devicename
        if self._committed:
            actions = [
                _action("block-dirty-bitmap-clear", node=node, name=name),
                _action("block-dirty-bitmap-merge", node=node, target=name, bitmaps=[nxt]),
                _action("block-dirty-bitmap-enable", node=node, name=name),
                _action("block-dirty-bitmap-remove", node=node, name=nxt),
            ]
            done = f"{dev}: dirty bitmap {name} now holds the writes since this backup started"
            level = LogLevel.INFO
        elif d.plan.mode is BitmapMode.REUSE:
            actions = [
                _action("block-dirty-bitmap-merge", node=node, target=name, bitmaps=[nxt]),
                _action("block-dirty-bitmap-enable", node=node, name=name),
                _action("block-dirty-bitmap-remove", node=node, name=nxt),
            ]
            done = (
                f"{dev}: backup not completed: dirty bitmap {name} keeps its changes"
                " and the writes made during this backup"
            )
            level = LogLevel.WARN
        else:
            actions = [
                _action("block-dirty-bitmap-remove", node=node, name=name),
                _action("block-dirty-bitmap-remove", node=node, name=nxt),
            ]
            done = (
                f"{dev}: backup not completed: new dirty bitmap {name} removed,"
                " the next backup reads the whole disk"
            )
            level = LogLevel.WARN
        if self._try(f"{dev}: finish dirty bitmap {name}", "transaction", actions=actions):
            self._log(level, done)
        else:
            self._log(
                LogLevel.WARN,
                f"{dev}: dirty bitmap {name} could not be finished; the next backup"
                " finds it inconsistent and reads the whole disk",
            )


def _action(kind: str, **data: Any) -> dict[str, Any]:
    return {"type": kind, "data": data}
