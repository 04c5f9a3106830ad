"""Keys of a restored guest config that reach outside the guest, and their removal.

A guest config inside a backup is hostile input (whoever can write the backup
storage wrote it). Restored verbatim, these keys hand the guest, or whoever
wrote the backup, a piece of the host:

- both: ``hookscript`` (a host script run as root at every start);
- VMs: ``args`` (raw QEMU arguments), disks that are host paths (``/dev/sdb``,
  any absolute path) or the host's CD-ROM drive (``cdrom``), CD-ROM drives holding
  a storage volume that is no ISO image (another guest's disk), ``hostpciN``,
  ``usbN`` with ``host=`` or ``mapping=``, ``serialN``/``parallelN`` on host
  device paths, ``virtiofsN`` (host directories), ``ivshmem`` (memory shared with
  the host), ``rngN`` from a host device other than ``/dev/urandom`` and
  ``/dev/random``, ``cicustom`` (host snippet files read into the guest);
- containers: every raw ``lxc.*`` key (``lxc.mount.entry``, ``lxc.cgroup*``,
  ``lxc.apparmor.profile``, ``lxc.idmap``...), ``devN`` (host device nodes),
  ``mpN`` that are bind mounts of host directories or host block devices, and
  ``features`` other than ``nesting`` (Proxmox VE lets only root set them).

Proxmox VE keeps these for root-authorised cases only. :func:`restrict_config`
drops each with a warning naming key and value, unless the operator asked to
keep them (``--keep-host-access``).

``lxc.idmap`` is never taken from a backup, not even with that flag: it decides
which host uids the restored files and the running container get, and a map
such as ``u 0 0 65536`` makes the container's root the host's root. The restored
config gets the id map of the *target* instead: the ``lxc.idmap`` lines of the
container being replaced (``--force``), else none, so that ``unprivileged: 1``
means Proxmox VE's default map. Files are extracted with the map of the config
that is written, so ownership and the running container always agree.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from pvebackup.api.types import GuestType, IdMapEntry, LogFunction
from pvebackup.host.guests import (
    ConfigEntry,
    CtConfig,
    GuestConfig,
    VolumeSpec,
    parse_guest_config,
)

__all__ = ["HostAccess", "find_host_access", "restrict_config"]

_VM_DISK = re.compile(r"^(?:(?:ide|sata|scsi|virtio)\d+|efidisk0|tpmstate0)$")
_SAFE_RNG_SOURCES = frozenset({"/dev/urandom", "/dev/random"})
# Feature flags anyone with VM.Config rights may set in Proxmox VE; the others
# (keyctl, fuse, mknod, mount=..., force_rw_sys) need root there.
_SAFE_FEATURES = frozenset({"nesting"})


@dataclass(frozen=True, slots=True)
class HostAccess:
    """One config line that grants host access.

    :ivar replacement: the value to write instead when only part of the line
        grants access (``features``), ``None`` to drop the line.
    """

    entry: ConfigEntry
    reason: str
    replacement: str | None = None

    @property
    def key(self) -> str:
        return self.entry.key

    @property
    def value(self) -> str:
        return self.entry.value


def _options(value: str) -> list[tuple[str, str]]:
    return [
        (name.strip(), val)
        for name, _, val in (p.partition("=") for p in value.split(",") if p.strip())
    ]


def _vm_reason(entry: ConfigEntry, where: str) -> str | None:
    key, value = entry.key, entry.value
    if key == "args":
        return "raw QEMU arguments"
    if key == "cicustom":
        return "reads host snippet files into the guest"
    if key == "ivshmem":
        return "memory shared with the host"
    if re.fullmatch(r"hostpci\d+", key):
        return "host PCI device"
    if re.fullmatch(r"virtiofs\d+", key):
        return "host directory"
    if re.fullmatch(r"usb\d+", key):
        names = {name for name, _ in _options(value)}
        return "host USB device" if names & {"host", "mapping"} else None
    if re.fullmatch(r"(?:serial|parallel)\d+", key):
        return "host device" if value.startswith("/") else None
    if re.fullmatch(r"rng\d+", key):
        sources = [v for name, v in _options(value) if name == "source"]
        return None if sources and set(sources) <= _SAFE_RNG_SOURCES else "host device"
    if _VM_DISK.match(key):
        spec = VolumeSpec.parse(key, value, where=where, line=entry.line)
        if spec.volume.startswith("/"):
            return "host block device or file"
        if spec.volume == "cdrom":
            return "the host's CD-ROM drive"
        volid = spec.volid
        if spec.option("media") == "cdrom" and volid is not None:
            if not volid.partition(":")[2].startswith("iso/"):
                return "a storage volume that is not in the backup"
    return None


def _ct_reason(entry: ConfigEntry, where: str) -> tuple[str, str | None] | None:
    key, value = entry.key, entry.value
    if key.startswith("lxc."):
        return "raw LXC key", None
    if re.fullmatch(r"dev\d+", key):
        return "host device", None
    if re.fullmatch(r"mp\d+", key):
        spec = VolumeSpec.parse(key, value, where=where, line=entry.line)
        if spec.volid is not None:
            return None
        if spec.volume.startswith("/dev/"):
            return "host block device", None
        return "bind mount of a host path", None
    if key == "features":
        kept = [(n, v) for n, v in _options(value) if n in _SAFE_FEATURES]
        if len(kept) == len(_options(value)):
            return None
        rest = ",".join(f"{n}={v}" for n, v in kept)
        return "feature flags other than nesting", rest or None
    return None


def find_host_access(config: GuestConfig) -> list[HostAccess]:
    """Every line of ``config``'s main section that grants host access, in order."""
    found: list[HostAccess] = []
    for entry in config.entries:
        if entry.key == "hookscript":
            found.append(HostAccess(entry, "a host script run at every start"))
        elif config.vmtype == GuestType.QEMU:
            reason = _vm_reason(entry, config.where)
            if reason is not None:
                found.append(HostAccess(entry, reason))
        else:
            ct = _ct_reason(entry, config.where)
            if ct is not None:
                found.append(HostAccess(entry, ct[0], ct[1]))
    return found


def restrict_config(
    config: GuestConfig,
    *,
    keep_host_access: bool,
    target_id_map: Sequence[IdMapEntry] = (),
    log: LogFunction,
) -> GuestConfig:
    """``config`` without the lines that grant host access, each dropped with a warning.

    :param keep_host_access: keep those lines (each still logged), except
        ``lxc.idmap``, which never comes from a backup.
    :param target_id_map: the explicit ``lxc.idmap`` of the container being
        replaced; written instead of the backup's (containers only).
    :returns: the config re-parsed from the restricted text, so that its
        ``id_map()`` is the map the restored container runs with.
    """
    drop: set[int] = set()
    replace: dict[int, str] = {}
    for access in find_host_access(config):
        line = access.entry.line
        if access.key == "lxc.idmap":
            log(
                "warn",
                f"lxc.idmap: {access.value}: dropped from the restored config; the id map"
                " comes from the target, never from a backup",
            )
            drop.add(line)
        elif keep_host_access:
            log("warn", f"{access.key}: {access.value}: kept ({access.reason};"
                " --keep-host-access)")
        elif access.replacement is not None:
            log(
                "warn",
                f"{access.key}: {access.value}: restored as {access.replacement!r}"
                f" ({access.reason} dropped; --keep-host-access keeps them)",
            )
            replace[line] = access.replacement
        else:
            log(
                "warn",
                f"{access.key}: {access.value}: dropped from the restored config"
                f" ({access.reason}; --keep-host-access keeps it)",
            )
            drop.add(line)
    lines = [f"#{d}" for d in config.description]
    for entry in config.entries:
        if entry.line in drop:
            continue
        lines.append(f"{entry.key}: {replace.get(entry.line, entry.value)}")
    if isinstance(config, CtConfig):
        lines.extend(f"lxc.idmap: {' '.join(e.as_list())}" for e in target_id_map)
    text = "\n".join(lines) + "\n"
    restricted = parse_guest_config(text, config.vmid, config.vmtype, where=config.where)
    if isinstance(restricted, CtConfig) and not restricted.id_map():
        # Proxmox VE restores a privileged backup as privileged for root, and so do
        # we; but say so, as a backup edited on the storage can drop the flag.
        log(
            "warn",
            "the backed-up config has no 'unprivileged: 1': restoring a privileged"
            " container, whose root is the host's root",
        )
    return restricted
