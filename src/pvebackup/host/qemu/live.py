"""Backup exports inside a running VM's own QEMU (vzdump's modes snapshot and suspend).

The node graph is :class:`~.export.BackupExport`'s, built in the VM's QEMU instead
of a daemon of ours, with the VM's own image node as ``file`` of the filter::

    device scsi0 (drive-scsi0)            device scsi0 (drive-scsi0)
      -> #block123 (qcow2, the image)  =>   -> pvb-cbw<i> copy-before-write
                                                 file   -> #block123
                                                 target -> pvb-fleece<i>
                                            NBD export drive-scsi0 -> pvb-snap<i> -> pvb-cbw<i>

The filter goes above the running device with ``qom-set`` of the device's ``drive``
property (QEMU's own image-fleecing test does the same); teardown sets it back to
the original node before the filter is removed. The instant of the backup is the
switch: bitmap transaction, filter, ``qom-set``, done while the VM is paused for a
moment (``stop``/``cont``, which drains its I/O) so that no guest write falls
between the frozen bitmap and the filter. With a guest agent, its file systems
are frozen around that moment.

Every change is recorded in the guest's run state *after* QEMU made it, as the full
list of what this run put into the VM. A run killed with SIGKILL leaves the VM
running with our filter inside; :func:`remove_leftovers` (called by the next run
holding the guest's lock) removes them in teardown order and puts the original
node back under the device. Bitmaps a killed run started are then found
disabled or with a ``+next`` left over and recreated (a full read), as offline.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pvebackup.api.errors import ExternalToolError, QmpError
from pvebackup.api.types import LogFunction, LogLevel
from pvebackup.kit.proc import private_dir

from .agent import frozen_filesystems
from .bitmaps import BitmapPlan, plan_bitmap
from .export import BackupExport, DiskSpec, _Disk
from .fleecing import FleecingVolumes
from .qmp import QmpClient, QmpConnectionError
from .running import LiveDisk, RunningVm, check_features, resolve_disk

__all__ = ["LiveBackupExport", "LiveRecorder", "remove_leftovers"]

_MAX_PARENT_LEN = 64  # + "/pvebackup-live-XXXXXXXX/nbd.sock" stays below 107 bytes

LiveRecorder = Callable[[dict[str, Any] | None], None]
"""Stores what the export put into the VM (None: nothing any more)."""


class LiveBackupExport(BackupExport):
    """:class:`BackupExport` in the running VM ``vm``'s QEMU.

    :param mode: ``snapshot`` (guest keeps running; a short pause at the switch)
        or ``suspend`` (the VM is paused from the start of the set-up until the
        exports are up).
    :param agent: the guest agent socket when the config says ``agent: 1``.
    :param record: called with the run-state record after every change.
    :param agent_timeout: seconds the guest agent may take per command.
    """

    def __init__(
        self,
        disks: Sequence[DiskSpec],
        vm: RunningVm,
        *,
        storeid: str,
        bitmap_id: str | None,
        log: LogFunction,
        workdir: Path | None = None,
        fleecing: FleecingVolumes | None = None,
        mode: str = "snapshot",
        agent: Path | None = None,
        record: LiveRecorder | None = None,
        agent_timeout: float = 10.0,
        qmp_timeout: float = 60.0,
    ) -> None:
        super().__init__(
            disks,
            storeid=storeid,
            bitmap_id=bitmap_id,
            log=log,
            workdir=workdir,
            fleecing=fleecing,
        )
        if mode not in ("snapshot", "suspend"):
            raise ValueError(f"mode {mode!r}")
        self.vm = vm
        self.mode = mode
        self._agent = agent
        self._record = record
        self._agent_timeout = agent_timeout
        self._qmp_timeout = qmp_timeout
        self._client: QmpClient | None = None
        self._live: dict[str, LiveDisk] = {}
        self._inserted: set[int] = set()
        self._paused = False
        self._failed_steps = 0
        self._nbd_planned = False
        self._sock_dir: Path | None = None

    @property
    def pid(self) -> int:
        return self.vm.pid

    # -- hooks --------------------------------------------------------------------

    def _start_backend(self) -> Path:
        try:
            self._client = QmpClient(str(self.vm.qmp_path), timeout=self._qmp_timeout)
        except OSError as exc:
            raise ExternalToolError(
                f"VM {self.vm.vmid} runs (PID {self.vm.pid}) but its QMP socket"
                f" {self.vm.qmp_path} does not answer: {exc}"
            ) from exc
        check_features(self._client)
        for spec in self._specs:
            self._live[spec.devicename] = resolve_disk(
                self._client, spec.devicename, spec.path, spec.volume
            )
        if self.mode == "suspend":
            self._pause()
        # The NBD socket lives in the run's private directory; QEMU (root) creates it.
        parent = self._workdir
        if parent is not None and len(str(parent.resolve())) > _MAX_PARENT_LEN:
            parent = None  # Unix socket paths are limited to 107 bytes
        self._sock_dir = private_dir("pvebackup-live-", parent)
        return self._sock_dir

    def _inspect(self) -> list[tuple[int, BitmapPlan]]:
        plans: list[tuple[int, BitmapPlan]] = []
        for spec in self._specs:
            live = self._live[spec.devicename]
            plan = plan_bitmap(
                live.info,
                devicename=spec.devicename,
                storeid=self.storeid,
                bitmap_id=self.bitmap_id,
                log=self._log,
            )
            plans.append((live.info.virtual_size, plan))
        for spec, (_, plan) in zip(self._specs, plans, strict=True):
            for name in plan.remove:
                self._remove_bitmap(spec, name)
        return plans

    def _remove_bitmap(self, spec: DiskSpec, name: str) -> None:
        node = self._live[spec.devicename].node
        self._qmp("block-dirty-bitmap-remove", node=node, name=name)

    def _disk_node_of(self, index: int) -> str:
        return self._live[self._specs[index].devicename].node

    def _filter_file_of(self, index: int) -> str:
        # Above a throttle filter: the guest's I/O stays throttled as before.
        return self._live[self._specs[index].devicename].top

    def _add_nodes(self, d: _Disk) -> None:
        self._add_fleece(d)  # the image node is the VM's own

    def _switch_views(self) -> None:
        # suspend mode: the guest is paused, its file systems need no freeze.
        freeze = (
            frozen_filesystems(self._agent, log=self._log, timeout=self._agent_timeout)
            if self.mode == "snapshot"
            else contextlib.nullcontext(False)
        )
        with freeze:
            was_paused = self._paused
            self._pause()
            try:
                super()._switch_views()
            finally:
                if not was_paused:
                    self._resume()

    def _insert_filter(self, d: _Disk) -> None:
        live = self._live[d.spec.devicename]
        self._qmp("qom-set", path=live.qom_path, property="drive", value=f"pvb-cbw{d.index}")
        self._inserted.add(d.index)
        self._changed()

    def _before_node_del(self, d: _Disk, node: str) -> None:
        if node == f"pvb-cbw{d.index}" and d.index in self._inserted:
            live = self._live[d.spec.devicename]
            if self._try(
                f"put {live.top} back under {live.qom_path}",
                "qom-set",
                path=live.qom_path,
                property="drive",
                value=live.top,
            ):
                self._inserted.discard(d.index)

    def _connect(self) -> QmpClient:
        if self._client is None or not self._client.connected:
            try:
                self._client = QmpClient(str(self.vm.qmp_path), timeout=self._qmp_timeout)
            except OSError as exc:
                raise QmpConnectionError(f"QMP {self.vm.qmp_path}: {exc}") from exc
        return self._client

    def _qmp(self, cmd: str, /, **args: Any) -> Any:
        self._connect()
        assert self._client is not None
        if cmd == "nbd-server-start":
            # Recorded before: a run killed right after must stop the server it
            # started, and never one the VM had of its own (migration).
            self._nbd_planned = True
            self._changed()
        return self._client.execute(cmd, **args)

    def _try(self, what: str, cmd: str, /, **args: Any) -> bool:
        ok = super()._try(what, cmd, **args)
        self._failed_steps += not ok
        return ok

    def _changed(self) -> None:
        if self._record is not None:
            self._record(self._record_data())

    def _record_data(self) -> dict[str, Any]:
        return {
            "qmp": str(self.vm.qmp_path),
            "pid": self.vm.pid,
            "paused": self._paused,
            "nbd_server": self._nbd_planned,
            "disks": [
                {
                    "qom_path": self._live[d.spec.devicename].qom_path,
                    "node": self._live[d.spec.devicename].top,  # what the device goes back to
                    "filter": f"pvb-cbw{d.index}",
                }
                for d in self._disks
            ],
        }

    def _pause(self) -> None:
        if not self._paused:
            if not self._qmp("query-status").get("running", False):
                return  # paused by someone else: it stays as they left it
            self._qmp("stop")
            self._paused = True
            self._changed()

    def _resume(self) -> None:
        if self._paused:
            self._qmp("cont")
            self._paused = False
            self._changed()

    # -- teardown -------------------------------------------------------------------

    def _setup(self) -> None:
        super()._setup()
        self._resume()  # suspend mode: the exports are up, the guest goes on
        # A QMP socket serves one client at a time: the node's own tools (qm
        # status, ...) must get it while the data flows. Teardown reconnects.
        assert self._client is not None
        self._client.close()

    def _teardown(self) -> None:
        client = self._client
        try:
            if client is not None:
                try:
                    client = self._connect()
                    if self._paused:
                        self._try("resume the VM", "cont")
                        self._paused = False
                    self._teardown_qmp()
                except QmpConnectionError as exc:
                    self._failed_steps += 1
                    self._log(LogLevel.ERR, f"cleanup: lost the VM's QMP connection: {exc}")
                    self._log_bitmaps_unknown()
                except QmpError as exc:
                    self._failed_steps += 1
                    self._log(LogLevel.ERR, f"cleanup: {exc}")
                if self._record is not None and not self._failed_steps:
                    self._record(None)
                elif self._failed_steps:
                    self._log(
                        LogLevel.WARN,
                        f"VM {self.vm.vmid}: not everything was removed from the running VM;"
                        " the next run of this guest tries again",
                    )
        finally:
            if self._client is not None:
                self._client.close()
            # Also when QEMU still has a fleecing image open: a file's inode lives
            # on until the next run's clean-up closes the node; a volume that
            # cannot be freed now is named in a warning.
            self._free_fleecing()
            if self._sock_dir is not None:
                shutil.rmtree(self._sock_dir, ignore_errors=True)


def remove_leftovers(record: dict[str, Any], *, vm_pid: int | None, log: LogFunction) -> bool:
    """Undo what a killed run put into a running VM, from its run-state ``record``.

    What is removed is what QEMU lists now under our names (``pvb-`` exports and
    nodes): a run killed between QEMU's answer and its own record still left
    them. The record tells which device to put back on which node, and whether
    the NBD server was ours.

    :param vm_pid: the VM's PID now (None: not running; then nothing is left).
    :returns: True when the VM is clean again (or gone), False when a step failed.
    """
    if vm_pid is None or vm_pid != record.get("pid"):
        return True  # the QEMU that held our nodes is gone, and with it the nodes
    try:
        client = QmpClient(str(record["qmp"]), timeout=30.0)
    except (OSError, QmpError, KeyError) as exc:
        log(LogLevel.WARN, f"cannot reach the running VM to remove an earlier run's nodes: {exc}")
        return False
    ok = True

    def step(what: str, cmd: str, **args: Any) -> None:
        nonlocal ok
        try:
            client.execute(cmd, **args)
            log(LogLevel.WARN, f"removed from the running VM: {what}")
        except QmpError as exc:
            ok = False
            log(LogLevel.WARN, f"cannot remove {what} from the running VM: {exc}")

    try:
        disks = [d for d in record.get("disks", []) if isinstance(d, dict)]
        if record.get("paused"):
            step("the pause of the VM", "cont")
        for e in client.execute("query-block-exports"):
            export_id = str(e.get("id", ""))
            if export_id.startswith("pvb-"):
                step(f"export {export_id}", "block-export-del", id=export_id, mode="hard")
        if record.get("nbd_server"):
            try:
                client.execute("nbd-server-stop")
            except QmpError:
                pass  # never started, or already stopped
        present = {
            str(n.get("node-name"))
            for n in client.execute("query-named-block-nodes", flat=True)
        }
        for d in disks:
            flt, orig = str(d.get("filter", "")), str(d.get("node", ""))
            index = flt.removeprefix("pvb-cbw")
            snap, fleece = f"pvb-snap{index}", f"pvb-fleece{index}"
            if snap in present:
                step(f"node {snap}", "blockdev-del", **{"node-name": snap})
            if flt.startswith("pvb-cbw") and flt in present:
                # The device may or may not be on the filter yet: put it back anyway.
                step(
                    f"filter {flt} above {orig}",
                    "qom-set",
                    path=str(d.get("qom_path")),
                    property="drive",
                    value=orig,
                )
                step(f"node {flt}", "blockdev-del", **{"node-name": flt})
            if fleece in present:
                step(f"node {fleece}", "blockdev-del", **{"node-name": fleece})
    except QmpConnectionError as exc:
        log(LogLevel.WARN, f"lost the running VM's QMP connection while cleaning up: {exc}")
        ok = False
    except QmpError as exc:
        log(LogLevel.WARN, f"cannot list the running VM's nodes: {exc}")
        ok = False
    finally:
        client.close()
    return ok
