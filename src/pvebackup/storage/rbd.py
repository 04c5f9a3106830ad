"""``rbd``: VM disks as Ceph RBD images.

As Proxmox VE's ``RBDPlugin``: volname ``[base-X-.../]vm-<vmid>-disk-<n>`` (raw),
in pool ``pool`` (default ``rbd``) and optional ``namespace``.

How QEMU opens it (decided here, as PVE does by ``krbd``):

- ``krbd 0`` (default): through QEMU's own rbd driver, no kernel mapping. The
  path is PVE's ``rbd:<pool>[/<ns>]/<name>[:conf=...][:mon_host=...]...`` (what
  ``pvesm path`` prints and ``qemu-img`` takes); the backup export opens it with
  a ``blockdev-add`` of driver ``rbd`` (pool, namespace, image, conf, user). The
  key comes from the ceph.conf named by ``conf`` (``/etc/pve/ceph.conf`` on a
  hyper-converged node, ``/etc/pve/priv/ceph/<ID>.conf`` for an external
  cluster), as QEMU's blockdev has no keyring option.
- ``krbd 1``: the kernel block device ``/dev/rbd-pve/<fsid>/<pool>[/<ns>]/<name>``
  (``fsid`` from the storage, else the ``fsid`` of ``/etc/pve/ceph.conf``),
  mapped by ``rbd map`` when missing, opened as ``host_device``.

Allocation is ``rbd -p POOL [--namespace NS] ... create --image-format 2 --size
<MiB> [--data-pool P] NAME``; freeing ``rbd ... snap purge NAME`` then ``rm``.
"""

from __future__ import annotations

import configparser
import os
import re
from collections.abc import Mapping
from typing import Any, ClassVar

from pvebackup.api.errors import StateError, StorageConfigError, UsageError
from pvebackup.storage.guestvol import (
    GuestVolume,
    GuestVolumeStorage,
    check_vm_name,
    next_disk_name,
    run_tool,
)
from pvebackup.storage.properties import PropertySpec
from pvebackup.storage.pve import PVE_STORAGE_PROPERTIES

__all__ = ["RbdPlugin"]

_VOLNAME = re.compile(r"^((base-(\d+)-[^\s/@:]+)/)?((?:base|vm)-(\d+)-[^\s/@:]+)$")
# Pool and namespace names end up in an rbd: name where ':' and '@' are syntax.
_RBD_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$", re.I)
PVE_CEPH_CONF = "/etc/pve/ceph.conf"


class RbdPlugin(GuestVolumeStorage):
    """``rbd: ID`` with ``pool``, optional ``namespace``, ``monhost``, ``krbd``..."""

    type: ClassVar[str] = "rbd"
    properties: ClassVar[Mapping[str, PropertySpec]] = PVE_STORAGE_PROPERTIES["rbd"]
    image_formats: ClassVar[tuple[str, ...]] = ("raw",)
    zeroed_images: ClassVar[bool] = True

    @staticmethod
    def parse_volname(volname: str) -> tuple[str, int]:
        m = _VOLNAME.match(volname)
        if m is None:
            raise UsageError(f"unable to parse rbd volume name {volname!r}")
        return m.group(4), int(m.group(5))

    def _names(self, scfg: Mapping[str, str], storeid: str) -> tuple[str, str | None]:
        props = self.parse_properties(scfg, storeid)
        pool = props.text("pool") or "rbd"
        namespace = props.text("namespace")
        for what, value in (("pool", pool), ("namespace", namespace)):
            if value is not None and not _RBD_NAME.match(value):
                raise StorageConfigError(f"storage '{storeid}': invalid {what} {value!r}")
        return pool, namespace

    def _rbd_path(self, scfg: Mapping[str, str], storeid: str, name: str) -> str:
        pool, namespace = self._names(scfg, storeid)
        return "/".join(p for p in (pool, namespace, name) if p is not None)

    def _connect(self, scfg: Mapping[str, str], storeid: str) -> dict[str, str]:
        """PVE's ``ceph_connect_option``: conf, mon_host, userid, keyring."""
        props = self.parse_properties(scfg, storeid)
        opts: dict[str, str] = {}
        priv_conf = f"/etc/pve/priv/ceph/{storeid}.conf"
        keyring = f"/etc/pve/priv/ceph/{storeid}.keyring"
        monhost = props.text("monhost")
        if monhost:
            opts["mon_host"] = ";".join(re.split(r"[\s,;]+", monhost.strip()))
            opts["auth_supported"] = "cephx" if os.path.exists(keyring) else "none"
            if os.path.exists(priv_conf):
                opts["conf"] = priv_conf
        elif os.path.exists(PVE_CEPH_CONF):
            opts["conf"] = PVE_CEPH_CONF
        opts["userid"] = props.text("username") or "admin"
        if props.text("keyring") or (monhost and os.path.exists(keyring)):
            opts["keyring"] = keyring
        return opts

    def guest_volume(self, scfg: Mapping[str, str], storeid: str, volname: str) -> GuestVolume:
        name, _ = self.parse_volname(volname)
        rbd_path = self._rbd_path(scfg, storeid, name)
        if self.parse_properties(scfg, storeid).flag("krbd"):
            fsid = self._fsid(scfg, storeid)
            return GuestVolume(f"/dev/rbd-pve/{fsid}/{rbd_path}", "raw", "host_device")
        opts = self._connect(scfg, storeid)
        path = f"rbd:{rbd_path}"
        if "conf" in opts:
            path += f":conf={opts['conf']}"
        if "mon_host" in opts:
            path += f":mon_host={opts['mon_host'].replace(':', chr(92) + ':')}"
            path += f":auth_supported={opts['auth_supported']}"
        if "keyring" in opts:
            path += f":id={opts['userid']}:keyring={opts['keyring']}"
        pool, namespace = self._names(scfg, storeid)
        node: dict[str, Any] = {"pool": pool, "image": name, "user": opts["userid"]}
        if namespace is not None:
            node["namespace"] = namespace
        if "conf" in opts:
            node["conf"] = opts["conf"]
        if "mon_host" in opts:
            node["server"] = [_server(h) for h in opts["mon_host"].split(";") if h]
        return GuestVolume(path, "raw", "rbd", node)

    def _fsid(self, scfg: Mapping[str, str], storeid: str) -> str:
        fsid = self.parse_properties(scfg, storeid).text("fsid")
        if not fsid:
            conf = configparser.ConfigParser(strict=False, interpolation=None)
            try:
                conf.read(PVE_CEPH_CONF)
            except configparser.Error as exc:
                raise StorageConfigError(f"cannot read {PVE_CEPH_CONF}: {exc}") from exc
            fsid = conf.get("global", "fsid", fallback="")
        if not _UUID.match(fsid):
            raise StorageConfigError(
                f"storage '{storeid}' (krbd): cluster fsid {fsid!r} has an invalid format"
                f" (set 'fsid' or give {PVE_CEPH_CONF} a [global] fsid)"
            )
        return fsid.lower()

    def rbd_argv(self, scfg: Mapping[str, str], storeid: str, op: str, *args: str) -> list[str]:
        """PVE's ``$rbd_cmd``: connection options, then ``op`` and its arguments."""
        pool, namespace = self._names(scfg, storeid)
        argv = ["rbd", "-p", pool]
        if namespace is not None and op != "unmap":
            argv += ["--namespace", namespace]
        opts = self._connect(scfg, storeid)
        if "conf" in opts:
            argv += ["-c", opts["conf"]]
        if "mon_host" in opts:
            argv += ["-m", opts["mon_host"], "--auth_supported", opts["auth_supported"]]
        argv += ["-n", f"client.{opts['userid']}"]
        if "keyring" in opts:
            argv += ["--keyring", opts["keyring"]]
        return [*argv, op, *args]

    def activate_volume(self, scfg: Mapping[str, str], storeid: str, volname: str) -> bool:
        if not self.parse_properties(scfg, storeid).flag("krbd"):
            return False  # QEMU's rbd driver connects itself
        vol = self.guest_volume(scfg, storeid, volname)
        if os.path.exists(vol.path):
            return False
        name, _ = self.parse_volname(volname)
        run_tool(self.rbd_argv(scfg, storeid, "map", name), f"rbd map {name}")
        return True

    def deactivate_volume(self, scfg: Mapping[str, str], storeid: str, volname: str) -> None:
        # PVE's unmap_volume: the kernel mapping is dropped by its device path.
        if not self.parse_properties(scfg, storeid).flag("krbd"):
            return
        vol = self.guest_volume(scfg, storeid, volname)
        if not os.path.exists(vol.path):
            return
        run_tool(self.rbd_argv(scfg, storeid, "unmap", vol.path), f"rbd unmap {vol.path}")

    def _images(self, scfg: Mapping[str, str], storeid: str) -> list[str]:
        return run_tool(self.rbd_argv(scfg, storeid, "ls"), f"rbd ls on '{storeid}'").split()

    def volume_exists(self, scfg: Mapping[str, str], storeid: str, volname: str) -> bool:
        return self.parse_volname(volname)[0] in self._images(scfg, storeid)

    def next_volname(self, scfg: Mapping[str, str], storeid: str, vmid: int, fmt: str) -> str:
        self.check_format(storeid, fmt)
        return next_disk_name(self._images(scfg, storeid), vmid)

    def allocate(
        self,
        scfg: Mapping[str, str],
        storeid: str,
        vmid: int,
        fmt: str,
        size: int,
        volname: str,
    ) -> str:
        self.check_format(storeid, fmt)
        if size <= 0:
            raise UsageError(f"invalid image size {size}")
        check_vm_name(storeid, volname, vmid, ("vm",))
        name, _ = self.parse_volname(volname)
        if name in self._images(scfg, storeid):
            raise StateError(f"volume {storeid}:{name} exists already")
        mib = -(-size // (1024 * 1024))
        args = ["--image-format", "2", "--size", str(mib)]
        data_pool = self.parse_properties(scfg, storeid).text("data-pool")
        if data_pool:
            args += ["--data-pool", data_pool]
        run_tool(self.rbd_argv(scfg, storeid, "create", *args, name), f"rbd create {name}")
        return name

    def free(self, scfg: Mapping[str, str], storeid: str, volname: str) -> None:
        name, _ = self.parse_volname(volname)
        run_tool(self.rbd_argv(scfg, storeid, "snap", "purge", name), f"rbd snap purge {name}")
        run_tool(self.rbd_argv(scfg, storeid, "rm", name), f"rbd rm {name}")


def _server(host: str) -> dict[str, str]:
    """A monitor ``host[:port]`` or ``[v6]:port`` as QEMU's InetSocketAddressBase."""
    m = re.match(r"^\[([^\]]+)\](?::(\d+))?$", host) or re.match(r"^([^:]+)(?::(\d+))?$", host)
    if m is None:
        return {"host": host, "port": "6789"}
    return {"host": m.group(1), "port": m.group(2) or "6789"}
