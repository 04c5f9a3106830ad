"""The bridge helper dressed as a seed-API provider, for the contract suite.

``bridged-<type>`` storages have the properties of ``<type>`` (``backup-dir``,
``backup-store``); their provider starts ``python3 -m pvebackup.bridge`` and maps
every seed call onto the merged API it speaks (the "seed API -> merged API" table
of docs/bridge-protocol.md), the way the Perl plugin does for Proxmox VE. The
contract suite then drives the real host (exports, containers, restores) against
the real provider *through the bridge*, in another process: whatever the suite
checks for a provider directly, it checks through the bridge too.

Container backups go through an attached helper in a user namespace
(``userns_exec.py``), as vzdump's ``run_in_userns`` does.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

from bridge_client import helper_env

from pvebackup.api import errors
from pvebackup.api.errors import PluginError, PveBackupError, UsageError
from pvebackup.api.idmap import IdMapper
from pvebackup.api.provider import BackupProvider, no_backup_started
from pvebackup.api.types import (
    BackupMechanism,
    BitmapMode,
    DeviceInfo,
    GuestType,
    IdMapEntry,
    LogFunction,
    RestoreMechanism,
)
from pvebackup.kit.hoststate import STATE_DIR_ENV
from pvebackup.kit.nbdsource import connect
from pvebackup.kit.oserrors import os_error
from pvebackup.storage import PropertySpec, StoragePlugin, VolumeInfo, registry

_USERNS = str(Path(__file__).with_name("userns_exec.py"))


def _error(body: Mapping[str, Any]) -> PveBackupError:
    """The error response as the class it names (the Perl side only dies; the
    suite checks classes, so they must survive the trip)."""
    cls = getattr(errors, str(body.get("type")), None)
    if not (isinstance(cls, type) and issubclass(cls, PveBackupError)):
        cls = PveBackupError
    exc = cls.__new__(cls)
    Exception.__init__(exc, str(body.get("message", "")))
    return exc


class _Pipe:
    """One helper process; requests in order, log lines to ``log``."""

    def __init__(self, log: LogFunction, prefix: Sequence[str] = ()) -> None:
        self.log = log
        self.proc = subprocess.Popen(
            [*prefix, sys.executable, "-m", "pvebackup.bridge"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=helper_env(),
        )  # fmt: skip
        self.lock = threading.Lock()
        self.next = 0
        self.closer = weakref.finalize(self, _stop, self.proc)

    def call(self, method: str, **params: Any) -> Any:
        with self.lock:
            assert self.proc.stdin is not None and self.proc.stdout is not None
            if self.proc.poll() is not None:
                raise PluginError(f"the bridge helper is gone (exit {self.proc.returncode})")
            self.next += 1
            line = json.dumps({"id": self.next, "method": method, "params": params})
            self.proc.stdin.write(line.encode() + b"\n")
            self.proc.stdin.flush()
            while True:
                raw = self.proc.stdout.readline()
                if not raw:
                    raise PluginError(f"the bridge helper died during {method}")
                msg = json.loads(raw)
                if "log" in msg:
                    self.log(msg["log"]["level"], msg["log"]["message"])
                    continue
                if "error" in msg:
                    raise _error(msg["error"])
                return msg["result"]

    def eof(self) -> None:
        """Close the pipe: the helper aborts what is open and exits."""
        with self.lock:
            if self.proc.stdin is not None and not self.proc.stdin.closed:
                self.proc.stdin.close()
            assert self.proc.stdout is not None
            for raw in self.proc.stdout:
                msg = json.loads(raw)
                if "log" in msg:
                    self.log(msg["log"]["level"], msg["log"]["message"])
            self.proc.wait(60)
        self.closer()


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.stdin is not None and not proc.stdin.closed:
        try:
            proc.stdin.close()
        except OSError:
            pass
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()


class BridgedProvider(BackupProvider):
    """Seed calls in, merged calls out (docs/bridge-protocol.md, second table)."""

    def __init__(
        self, plugin: BridgedPlugin, scfg: Mapping[str, str], storeid: str, log: LogFunction
    ) -> None:
        super().__init__(plugin, scfg, storeid, log)
        self.hello = plugin.hello(scfg, storeid)
        self.pipe = _Pipe(log)
        self.pipe.call("hello", **self.hello)
        self.guests: dict[int, dict[str, Any]] = {}

    def _guest(self, vmid: int) -> dict[str, Any]:
        if vmid not in self.guests:
            raise UsageError(no_backup_started(vmid))
        return self.guests[vmid]

    def provider_name(self) -> str:
        return str(self.pipe.call("provider_name"))

    def job_start(self, start_time: int) -> None:
        self.pipe.call("job_init", start_time=start_time)

    def job_end(self) -> None:
        self.pipe.call("job_cleanup")
        self.pipe.call("bye")
        self.pipe.eof()

    def job_abort(self, error: str) -> None:
        # vzdump killed or interrupted: the helper's input ends.
        self.pipe.eof()

    def backup_start(self, vmid: int, vmtype: GuestType) -> None:
        init = self.pipe.call("backup_init", vmid=vmid, vmtype=str(vmtype),
                              start_time=int(time.time()))  # fmt: skip
        self.guests[vmid] = {"vmtype": vmtype, "archive-name": init["archive-name"]}

    def backup_get_mechanism(
        self, vmid: int, vmtype: GuestType
    ) -> tuple[BackupMechanism, str | None]:
        mechanism = self.pipe.call("backup_get_mechanism", vmid=vmid, vmtype=str(vmtype))
        if mechanism is None:
            return None  # type: ignore[return-value]
        if mechanism == "directory":
            return BackupMechanism.DIRECTORY, None
        bitmap = self.pipe.call("pvebackup_bitmap_id", vmid=vmid)["bitmap-id"]
        return BackupMechanism(mechanism), bitmap

    def backup_get_target(self, vmid: int, vmtype: GuestType) -> str:
        return str(self._guest(vmid)["archive-name"])

    def _read(self, vmid: int, filename: str) -> str:
        self._guest(vmid)
        try:
            return Path(filename).read_text()
        except OSError as exc:
            raise os_error(exc, f"cannot read {filename}") from exc

    def backup_guest_config(self, vmid: int, filename: str) -> None:
        self._guest(vmid)["config"] = self._read(vmid, filename)

    def backup_firewall_config(self, vmid: int, filename: str) -> None:
        self._guest(vmid)["firewall"] = self._read(vmid, filename)

    def _info(self, guest: dict[str, Any], limit: int | None) -> dict[str, Any]:
        info: dict[str, Any] = {"bandwidth-limit": limit or 0}
        if "firewall" in guest:
            info["firewall-config"] = guest["firewall"]
        return info

    def backup_nbd(
        self, vmid: int, devicename: str, nbd_path: str, bitmap_mode: BitmapMode,
        bitmap_name: str | None, bandwidth_limit: int | None,
    ) -> None:  # fmt: skip
        guest = self._guest(vmid)
        source = connect(nbd_path, devicename, None)
        try:
            size = source.size
        finally:
            source.close()
        volume = {"size": size, "bitmap-mode": str(bitmap_mode), "nbd-path": nbd_path,
                  "bitmap-name": bitmap_name}  # fmt: skip
        self.pipe.call("backup_vm", vmid=vmid, guest_config=guest.get("config", ""),
                       volumes={devicename: volume}, info=self._info(guest, bandwidth_limit))

    def backup_directory(
        self, vmid: int, directory: str, id_map: Sequence[Sequence[str]],
        exclude_paths: Sequence[str], sources: Sequence[str], bandwidth_limit: int | None,
    ) -> None:  # fmt: skip
        guest = self._guest(vmid)
        entries = [IdMapEntry.from_seed(e) for e in id_map]
        user = IdMapper(entries).ct_to_host_uid(0) if entries else 0
        info = {"directory": directory, "sources": list(sources), "backup-user-id": user,
                **self._info(guest, bandwidth_limit)}  # fmt: skip
        token = self.pipe.call("backup_container_prepare", vmid=vmid, info=info)["attach"]
        params = {"vmid": vmid, "guest_config": guest.get("config", ""),
                  "exclude_patterns": list(exclude_paths), "info": info}  # fmt: skip
        if not entries:
            self.pipe.call("backup_container", **params)
            return
        count = next(e.count for e in entries if e.kind == "u" and e.ct_start == 0)
        child = _Pipe(self.log_function, [sys.executable, _USERNS, str(user), str(count), "--"])
        try:
            child.call("hello", protocol=1, attach=token)
            child.call("backup_container", **params)
            child.call("bye")
        finally:
            child.eof()

    def backup_end(self, vmid: int) -> None:
        guest = self._guest(vmid)
        result = self.pipe.call("backup_cleanup", vmid=vmid, vmtype=str(guest["vmtype"]),
                                success=1, info={})  # fmt: skip
        guest["size"] = result["stats"]["archive-size"]

    def backup_abort(self, vmid: int, error: str) -> None:
        guest = self.guests.get(vmid, {})
        vmtype = str(guest["vmtype"]) if guest else None
        self.pipe.call("backup_cleanup", vmid=vmid, vmtype=vmtype, success=0,
                       info={"error": error})  # fmt: skip

    def backup_handle_log_file(self, vmid: int, filename: str) -> None:
        self.pipe.call("backup_handle_log_file", vmid=vmid, filename=filename)

    def backup_get_task_size(self, vmid: int) -> int:
        guest = self._guest(vmid)
        if "size" not in guest:
            raise UsageError(f"no finished backup of guest {vmid}")
        return int(guest["size"])

    # -- restore ---------------------------------------------------------------------

    def restore_get_mechanism(
        self, volname: str, storeid: str
    ) -> tuple[RestoreMechanism, GuestType]:
        mechanism, vmtype = self.pipe.call("restore_get_mechanism", volname=volname,
                                           storeid=storeid)  # fmt: skip
        return RestoreMechanism(mechanism), GuestType(vmtype)

    def extract_guest_config(self, volname: str, storeid: str) -> str:
        return str(self.pipe.call("archive_get_guest_config", volname=volname))

    def extract_firewall_config(self, volname: str, storeid: str) -> str | None:
        result = self.pipe.call("archive_get_firewall_config", volname=volname, storeid=storeid)
        return None if result is None else str(result)

    def restore_qemu_get_device_info(self, volname: str, storeid: str) -> DeviceInfo:
        return self.pipe.call("restore_vm_init", volname=volname)  # type: ignore[no-any-return]

    def restore_qemu_img_init(self, volname: str, storeid: str, devicename: str) -> str:
        result = self.pipe.call("restore_vm_volume_init", volname=volname,
                                device_name=devicename, info={})  # fmt: skip
        return str(result["qemu-img-path"])

    def restore_qemu_img_cleanup(self, volname: str, storeid: str, devicename: str) -> None:
        self.pipe.call("restore_vm_volume_cleanup", volname=volname, device_name=devicename,
                       info={})  # fmt: skip

    def _container_init(self, volname: str, storeid: str, key: str) -> str:
        result = self.pipe.call("restore_container_init", volname=volname, storeid=storeid,
                                info={})  # fmt: skip
        if key not in result:
            raise PluginError(f"restore_container_init gave {sorted(result)}, not {key}")
        return str(result[key])

    def restore_tar_init(self, volname: str, storeid: str) -> str:
        return self._container_init(volname, storeid, "tar-path")

    def restore_tar_cleanup(self, volname: str, storeid: str) -> None:
        self.pipe.call("restore_container_cleanup", volname=volname, storeid=storeid, info={})

    def restore_directory_init(self, volname: str, storeid: str) -> str:
        return self._container_init(volname, storeid, "archive-directory")

    def restore_directory_cleanup(self, volname: str, storeid: str) -> None:
        self.pipe.call("restore_container_cleanup", volname=volname, storeid=storeid, info={})


class BridgedPlugin(StoragePlugin):
    """``bridged-<real_type>``: ``<real_type>``'s properties, its provider via the bridge."""

    real_type: ClassVar[str]

    def hello(self, scfg: Mapping[str, str], storeid: str) -> dict[str, Any]:
        real = {**scfg, "type": self.real_type}
        state = os.environ.get(STATE_DIR_ENV)
        return {"protocol": 1, "storeid": storeid, "plugin-type": self.real_type,
                "scfg": real, **({"state-dir": state} if state else {})}  # fmt: skip

    def new_backup_provider(
        self, scfg: Mapping[str, str], storeid: str, log_function: LogFunction
    ) -> BackupProvider | None:
        return BridgedProvider(self, scfg, storeid, log_function)

    def _once(self, scfg: Mapping[str, str], storeid: str, method: str, **params: Any) -> Any:
        pipe = _Pipe(lambda level, msg: None)
        try:
            pipe.call("hello", **self.hello(scfg, storeid))
            result = pipe.call(method, **params)
            pipe.call("bye")
            return result
        finally:
            pipe.eof()

    def list_volumes(self, scfg: Mapping[str, str], storeid: str) -> list[VolumeInfo]:
        found = self._once(scfg, storeid, "pvebackup_list_volumes")
        return [
            VolumeInfo(
                volid=v["volid"], vmid=v["vmid"], vmtype=GuestType(v["vmtype"]),
                ctime=v["ctime"], size=v["size"], format=v["format"], parent=v["parent"],
                notes=v["notes"], virtual_size=v["virtual-size"], comment=v["comment"],
                protected=v.get("protected", False),
            )  # fmt: skip
            for v in found
        ]

    def free_volume(self, scfg: Mapping[str, str], storeid: str, volname: str) -> None:
        self._once(scfg, storeid, "pvebackup_free_volume", volname=volname)

    def get_volume_attribute(
        self, scfg: Mapping[str, str], storeid: str, volname: str, attribute: str
    ) -> Any:
        return self._once(scfg, storeid, "pvebackup_get_volume_attribute", volname=volname,
                          attribute=attribute)  # fmt: skip

    def update_volume_attribute(
        self, scfg: Mapping[str, str], storeid: str, volname: str, attribute: str, value: Any
    ) -> None:
        self._once(scfg, storeid, "pvebackup_update_volume_attribute", volname=volname,
                   attribute=attribute, value=value)  # fmt: skip


def _bridged(real_type: str) -> type[BridgedPlugin]:
    real = registry.lookup(real_type)
    props: Mapping[str, PropertySpec] = real.properties
    return type(  # type: ignore[return-value]
        f"Bridged{real_type.title().replace('-', '')}Plugin",
        (BridgedPlugin,),
        {"type": f"bridged-{real_type}", "real_type": real_type, "properties": props,
         "children_need_parent": real.children_need_parent, "__module__": __name__},
    )  # fmt: skip


BridgedDirPlugin = _bridged("backup-dir")
BridgedStorePlugin = _bridged("backup-store")
