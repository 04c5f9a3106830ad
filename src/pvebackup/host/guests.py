"""Guests and the node root: the files Proxmox VE keeps under ``/etc/pve``.

A :class:`NodeRoot` is a directory that plays a node's ``/``: it holds
``etc/pve/storage.cfg``, ``etc/pve/qemu-server/<vmid>.conf``,
``etc/pve/lxc/<vmid>.conf`` and ``etc/pve/firewall/<vmid>.fw``.

Guest configs use Proxmox VE's syntax::

    # description lines (at the top, or anywhere in the main section)
    key: value
    boot:                               (an empty value: PVE reads it as '')
    scsi0: local:100/vm-100-disk-0.qcow2,size=1G
    scsi1: file=local:100/vm-100-disk-1.raw,,size=1G   (file=/volume=, empty parts)
    lxc.idmap: u 0 100000 65536         (lxc.* keys may repeat)
    lxc.apparmor.profile = unconfined   (lxc.* keys also with '=', as pct.adoc says)
    [snapshot-name]                     (snapshot and pending sections follow)

Only the main section is read; parsing stops at the first ``[...]`` line, the way a
backup copies only the current configuration. A malformed line raises
:class:`GuestConfigError` naming the file and the line.

Which volumes a backup includes follows Proxmox VE's ``get_backup_volumes``
exactly (``PVE::QemuConfig`` and ``PVE::LXC::Config``); ``reason`` says why, for the
task log:

- VM drives (``scsiN``, ``virtioN``, ``sataN``, ``ideN``, ``efidisk0``,
  ``tpmstate0``): CD-ROMs (``media=cdrom``, ``cdrom``, ``none``) are not volumes;
  every other drive is included unless ``backup=0``, storage volumes, passthrough
  devices (``/dev/sdg``) and plain image paths (``/mnt/file.raw``) alike;
  ``efidisk0`` is skipped unless ``bios: ovmf``.
- Container ``rootfs`` always; a mount point ``mpN`` only with ``backup=1`` and
  only when it is a storage volume (bind and device mounts never), exactly
  ``PVE::LXC::Config->mountpoint_backup_enabled``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pvebackup.api.errors import GuestConfigError, GuestNotFoundError, UnsafeStorageError
from pvebackup.api.idmap import DEFAULT_UNPRIVILEGED_MAP, parse_lxc_idmap
from pvebackup.api.types import GuestType, IdMapEntry
from pvebackup.kit import safefs
from pvebackup.kit.proc import process_start_time

__all__ = [
    "DEFAULT_UNPRIVILEGED_ID_MAP",
    "ConfigEntry",
    "CtConfig",
    "GuestConfig",
    "MountPoint",
    "NodeRoot",
    "VmConfig",
    "VmDisk",
    "VolumeSpec",
    "format_size",
    "parse_guest_config",
    "write_config_file",
]

DEFAULT_UNPRIVILEGED_ID_MAP = DEFAULT_UNPRIVILEGED_MAP
"""Proxmox VE's map for an unprivileged container without ``lxc.idmap`` lines."""

_KEY_RE = re.compile(r"^([A-Za-z][A-Za-z0-9_\-]*)\s*:\s*(.*?)\s*$")
# PVE::LXC::Config reads raw lxc.* keys with ':' or '=' (pct.adoc tells users to
# write ``lxc.apparmor.profile = unconfined``); they are written back with ':'.
_LXC_KEY_RE = re.compile(r"^(lxc(?:\.[A-Za-z0-9_\-]+)+)\s*(?::|=)\s*(.*?)\s*$")
# Keys whose value names a volume: an empty one is an error, never a skipped disk.
_VOLUME_KEY_RE = re.compile(
    r"^(?:(?:ide|sata|scsi|virtio)\d+|efidisk0|tpmstate0|rootfs|mp\d+|unused\d+)$"
)
_SECTION_RE = re.compile(r"^\[[^\]]+\]\s*$")
_VM_DISK_RE = re.compile(r"^(?:(?:ide|sata|scsi|virtio)\d+|efidisk0|tpmstate0)$")
_CT_MOUNT_RE = re.compile(r"^(?:rootfs|mp\d+)$")
_MP_DIGITS = 3
_STOREID_RE = re.compile(r"^[A-Za-z][A-Za-z0-9\-_.]*[A-Za-z0-9]$")
_TRUE = frozenset({"1", "yes", "on", "true"})
_FALSE = frozenset({"0", "no", "off", "false"})


def _parse_bool(value: str) -> bool | None:
    low = value.lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    return None


@dataclass(frozen=True, slots=True)
class ConfigEntry:
    """One ``key: value`` line of a config's main section (``line`` is 1-based)."""

    key: str
    value: str
    line: int


@dataclass(frozen=True, slots=True)
class VolumeSpec:
    """A drive or mount point value: ``VOLUME[,opt=val,...]``.

    ``volume`` is ``STOREID:VOLNAME`` for storage volumes, else what the config
    says (``none``, ``cdrom``, ``/dev/sdb``, a bind-mount source directory).
    """

    key: str
    volume: str
    options: tuple[tuple[str, str], ...] = ()

    @classmethod
    def parse(cls, key: str, value: str, *, where: str, line: int) -> VolumeSpec:
        volume: str | None = None
        options: list[tuple[str, str]] = []
        for part in value.split(","):
            part = part.strip()
            if not part:
                continue  # PVE's parse_property_string skips empty parts ("raw,,size=1G")
            if "=" in part:
                name, _, val = part.partition("=")
                # the volume's own key, given explicitly: file= (drives) or volume=
                # (mount points); PVE treats each as the other's alias
                if name in ("file", "volume"):
                    if volume is not None:
                        raise GuestConfigError(
                            f"{key}: the volume is given twice", path=where, line=line
                        )
                    volume = val
                    continue
                if not re.fullmatch(r"[a-z][a-z0-9_\-]*", name):
                    raise GuestConfigError(
                        f"{key}: bad option name {name!r}", path=where, line=line
                    )
                options.append((name, val))
            elif volume is None:
                volume = part
            else:
                raise GuestConfigError(
                    f"{key}: unexpected {part!r} (options are name=value)", path=where, line=line
                )
        if not volume:
            raise GuestConfigError(f"{key}: no volume given", path=where, line=line)
        if ":" in volume and not volume.startswith("/"):
            storeid, _, volname = volume.partition(":")
            if not _STOREID_RE.match(storeid) or not volname:
                raise GuestConfigError(
                    f"{key}: bad volume id {volume!r}", path=where, line=line
                )
        elif not volume.startswith("/") and (
            volume not in ("none", "cdrom") or not _VM_DISK_RE.match(key)
        ):
            # PVE's pve-volume-id-or-qm-path / pve-lxc-mp-string formats: PVE drops
            # such a drive with a warning; refusing it keeps a disk from going missing.
            raise GuestConfigError(
                f"{key}: {volume[:80]!r} is neither a volume id nor an absolute path",
                path=where,
                line=line,
            )
        return cls(key, volume, tuple(options))

    def option(self, name: str) -> str | None:
        for key, value in self.options:
            if key == name:
                return value
        return None

    @property
    def volid(self) -> str | None:
        """``STOREID:VOLNAME`` when the volume is a storage volume, else ``None``."""
        if self.volume.startswith("/") or ":" not in self.volume:
            return None
        return self.volume

    @property
    def storeid(self) -> str | None:
        return None if self.volid is None else self.volume.partition(":")[0]

    def render(self, *, volume: str | None = None, **changes: str) -> str:
        """The value as it is written in a config, with a new volume or options."""
        opts = [(k, changes.pop(k, v)) for k, v in self.options]
        opts.extend(changes.items())
        parts = [volume if volume is not None else self.volume]
        parts.extend(f"{k}={v}" for k, v in opts)
        return ",".join(parts)


@dataclass(frozen=True, slots=True)
class VmDisk:
    """A VM drive: its config key, value, and whether a backup includes it."""

    spec: VolumeSpec
    included: bool
    reason: str = ""

    @property
    def key(self) -> str:
        return self.spec.key

    @property
    def devicename(self) -> str:
        """Device and NBD export name, ``drive-<key>`` (``drive-scsi0``)."""
        return f"drive-{self.spec.key}"


@dataclass(frozen=True, slots=True)
class MountPoint:
    """A container volume: ``rootfs`` (``ct_path`` ``/``) or ``mpN``."""

    spec: VolumeSpec
    ct_path: str
    included: bool
    reason: str = ""

    @property
    def key(self) -> str:
        return self.spec.key


@dataclass(frozen=True)
class GuestConfig:
    """The main section of a guest config. ``where`` names its file for messages."""

    vmid: int
    vmtype: GuestType
    where: str
    description: tuple[str, ...] = ()
    entries: tuple[ConfigEntry, ...] = ()
    _index: dict[str, ConfigEntry] = field(default_factory=dict, repr=False, compare=False)

    def get(self, key: str) -> str | None:
        entry = self._index.get(key)
        return None if entry is None else entry.value

    def render(self, replace: Mapping[str, str | None] | None = None) -> str:
        """The config as text: main section only, ``replace`` maps key -> value or None."""
        replace = replace or {}
        lines = [f"#{d}" for d in self.description]
        for entry in self.entries:
            if entry.key in replace:
                new = replace[entry.key]
                if new is not None:
                    lines.append(f"{entry.key}: {new}")
            else:
                lines.append(f"{entry.key}: {entry.value}")
        present = {e.key for e in self.entries}
        for key, new in replace.items():
            if key not in present and new is not None:
                lines.append(f"{key}: {new}")
        return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class VmConfig(GuestConfig):
    """A VM (``qemu``) config with its drives parsed."""

    disks: tuple[VmDisk, ...] = ()

    def volume_ids(self) -> list[str]:
        """Every storage volume the VM owns (drives and ``unusedN``), for removal."""
        vols = [d.spec.volid for d in self.disks if d.spec.volid and _owned(d.spec, self.vmid)]
        for entry in self.entries:
            if re.fullmatch(r"unused\d+", entry.key):
                vols.append(entry.value.split(",")[0])
        return [v for v in vols if v]


@dataclass(frozen=True)
class CtConfig(GuestConfig):
    """A container (``lxc``) config with its volumes and id map parsed."""

    mountpoints: tuple[MountPoint, ...] = ()
    unprivileged: bool = False
    explicit_id_map: tuple[IdMapEntry, ...] = ()

    @property
    def rootfs(self) -> MountPoint:
        return self.mountpoints[0]

    def id_map(self) -> list[IdMapEntry]:
        """``lxc.idmap`` lines; Proxmox VE's default map when unprivileged without them."""
        if self.explicit_id_map:
            return list(self.explicit_id_map)
        if self.unprivileged:
            return list(DEFAULT_UNPRIVILEGED_ID_MAP)
        return []

    def volume_ids(self) -> list[str]:
        vols = [m.spec.volid for m in self.mountpoints if m.spec.volid]
        for entry in self.entries:
            if re.fullmatch(r"unused\d+", entry.key):
                vols.append(entry.value.split(",")[0])
        return [v for v in vols if v]


def _owned(spec: VolumeSpec, vmid: int) -> bool:
    # A cdrom ISO (local:iso/x.iso) belongs to nobody; image volumes are "<vmid>/..."
    # on dir-like storages, "vm-<vmid>-..." on lvm, zfspool and rbd.
    volid = spec.volid
    if volid is None:
        return False
    volname = volid.partition(":")[2]
    return volname.startswith((f"{vmid}/", f"vm-{vmid}-", f"subvol-{vmid}-"))


def _iter_main_section(text: str, where: str) -> Iterator[tuple[int, str | ConfigEntry]]:
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line:
            continue
        if _SECTION_RE.match(line):
            return
        if line.startswith("#"):
            yield lineno, raw.lstrip()[1:]
            continue
        m = _LXC_KEY_RE.match(line) if line.startswith("lxc.") else None
        m = m or _KEY_RE.match(line)
        if m is None:
            raise GuestConfigError(f"cannot parse line {line!r}", path=where, line=lineno)
        yield lineno, ConfigEntry(m.group(1), m.group(2), lineno)


def _parse_idmap(value: str, where: str, line: int) -> IdMapEntry:
    try:
        return parse_lxc_idmap(value)
    except ValueError as exc:
        raise GuestConfigError(str(exc), path=where, line=line) from exc


def parse_guest_config(text: str, vmid: int, vmtype: GuestType, *, where: str) -> GuestConfig:
    """Parse a VM or container config (main section only).

    :param where: the file name (or a label like ``backup:...``) used in errors.
    :raises GuestConfigError: a malformed line, naming ``where`` and the line.
    """
    description: list[str] = []
    entries: list[ConfigEntry] = []
    index: dict[str, ConfigEntry] = {}
    for lineno, item in _iter_main_section(text, where):
        if isinstance(item, str):
            description.append(item)
            continue
        if item.key in index and not item.key.startswith("lxc."):
            raise GuestConfigError(
                f"duplicate key {item.key!r} (first on line {index[item.key].line})",
                path=where,
                line=lineno,
            )
        if not item.value and _VOLUME_KEY_RE.match(item.key):
            # PVE keeps other empty values ("boot: " is an empty boot order); a
            # drive without a volume would be a disk silently left out of backups.
            raise GuestConfigError(f"{item.key}: empty value", path=where, line=lineno)
        index.setdefault(item.key, item)
        entries.append(item)
    base = {
        "vmid": vmid,
        "vmtype": vmtype,
        "where": where,
        "description": tuple(description),
        "entries": tuple(entries),
        "_index": index,
    }
    if vmtype == GuestType.QEMU:
        return VmConfig(**base, disks=tuple(_vm_disks(entries, where)))  # type: ignore[arg-type]
    return _ct_config(base, entries, where)


def _vm_disks(entries: Sequence[ConfigEntry], where: str) -> Iterator[VmDisk]:
    # PVE::QemuConfig->get_backup_volumes: every drive that is not a CD-ROM is a
    # backup volume, included by its backup flag, except an EFI disk without OVMF.
    bios = next((e.value for e in entries if e.key == "bios"), None)
    for entry in entries:
        if not _VM_DISK_RE.match(entry.key):
            continue
        spec = VolumeSpec.parse(entry.key, entry.value, where=where, line=entry.line)
        flag = spec.option("backup")
        backup = _parse_bool(flag if flag is not None else "1")
        if backup is None:
            raise GuestConfigError(
                f"{entry.key}: backup={flag!r} is not a boolean",
                path=where,
                line=entry.line,
            )
        if spec.volume in ("none", "cdrom") or spec.option("media") == "cdrom":
            yield VmDisk(spec, False, "CD-ROM drive")
        elif entry.key.startswith("efidisk") and bios != "ovmf":
            yield VmDisk(spec, False, "efidisk but no OVMF BIOS")
        elif not backup:
            yield VmDisk(spec, False, "backup=0")
        else:
            yield VmDisk(spec, True)


def _ct_config(base: dict[str, object], entries: Sequence[ConfigEntry], where: str) -> CtConfig:
    mounts: list[MountPoint] = []
    id_map: list[IdMapEntry] = []
    unprivileged = False
    for entry in entries:
        if entry.key == "unprivileged":
            flag = _parse_bool(entry.value)
            if flag is None:
                raise GuestConfigError(
                    f"unprivileged: {entry.value!r} is not a boolean", path=where, line=entry.line
                )
            unprivileged = flag
        elif entry.key == "lxc.idmap":
            id_map.append(_parse_idmap(entry.value, where, entry.line))
        elif _CT_MOUNT_RE.match(entry.key):
            mounts.append(_mountpoint(entry, where))
    mounts.sort(key=lambda m: (m.key != "rootfs", _mp_index(m.key)))
    if not mounts or mounts[0].key != "rootfs":
        raise GuestConfigError("container has no rootfs", path=where)
    if mounts[0].spec.volid is None:
        raise GuestConfigError("rootfs is not a storage volume", path=where)
    seen: dict[str, str] = {}
    for m in mounts:
        if m.ct_path in seen:
            raise GuestConfigError(
                f"{m.key}: mount path {m.ct_path} already used by {seen[m.ct_path]}", path=where
            )
        seen[m.ct_path] = m.key
    return CtConfig(
        **base,  # type: ignore[arg-type]
        mountpoints=tuple(mounts),
        unprivileged=unprivileged,
        explicit_id_map=tuple(id_map),
    )


def _mp_index(key: str) -> int:
    return int(key[2:]) if key.startswith("mp") else -1


def _mountpoint(entry: ConfigEntry, where: str) -> MountPoint:
    # Proxmox VE has mp0..mp255; a config from a backup may say mp<5000 digits>,
    # which int() refuses with a ValueError of its own.
    if entry.key != "rootfs" and len(entry.key) > 2 + _MP_DIGITS:
        raise GuestConfigError(
            f"{entry.key[:12]}...: mount point number out of range", path=where, line=entry.line
        )
    spec = VolumeSpec.parse(entry.key, entry.value, where=where, line=entry.line)
    if entry.key == "rootfs":
        return MountPoint(spec, "/", True)
    mp = spec.option("mp")
    if not mp or not mp.startswith("/"):
        raise GuestConfigError(
            f"{entry.key}: needs an absolute mp=/path", path=where, line=entry.line
        )
    parts = [p for p in mp.split("/") if p]
    if any(p in (".", "..") for p in parts) or not parts:
        raise GuestConfigError(f"{entry.key}: bad mount path {mp!r}", path=where, line=entry.line)
    backup = _parse_bool(spec.option("backup") or "0")
    if backup is None:
        raise GuestConfigError(
            f"{entry.key}: backup={spec.option('backup')!r} is not a boolean",
            path=where,
            line=entry.line,
        )
    ct_path = "/" + "/".join(parts)
    if spec.volid is None:
        return MountPoint(spec, ct_path, False, "bind or device mount")
    if not backup:
        return MountPoint(spec, ct_path, False, "no backup=1")
    return MountPoint(spec, ct_path, True)


def format_size(size: int) -> str:
    """Proxmox VE's ``size=`` notation: ``1G``, ``512M``, ``64K`` or bytes."""
    for unit, factor in (("T", 1 << 40), ("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if size and size % factor == 0:
            return f"{size // factor}{unit}"
    return str(size)


def write_config_file(path: Path, text: str) -> None:
    """Write ``text`` atomically (:func:`pvebackup.kit.safefs.atomic_write_path`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    safefs.atomic_write_path(path, text.encode("utf-8"))


_MAX_PIDFILE = 64  # a pid and a newline; anything longer is not a pid file


class NodeRoot:
    """A directory playing a Proxmox VE node's ``/`` (``--root``)."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"NodeRoot({str(self.root)!r})"

    @property
    def pve_dir(self) -> Path:
        return self.root / "etc" / "pve"

    @property
    def storage_cfg(self) -> Path:
        return self.pve_dir / "storage.cfg"

    @property
    def log_dir(self) -> Path:
        """Where per-guest task logs go, like vzdump's ``/var/log/vzdump``."""
        return self.root / "var" / "log" / "vzdump"

    @property
    def run_dir(self) -> Path:
        """Per-run state: guest locks and what a run has made (a tmpfs on a real node)."""
        return self.root / "run" / "pvebackup"

    def config_path(self, vmid: int, vmtype: GuestType) -> Path:
        sub = "qemu-server" if vmtype == GuestType.QEMU else "lxc"
        return self.pve_dir / sub / f"{vmid}.conf"

    def firewall_path(self, vmid: int) -> Path:
        return self.pve_dir / "firewall" / f"{vmid}.fw"

    @property
    def qemu_run_dir(self) -> Path:
        """Where Proxmox VE keeps a running VM's pid file and sockets."""
        return self.root / "var" / "run" / "qemu-server"

    def pidfile_pid(self, vmid: int) -> int | None:
        """The live process ``ROOT/var/run/qemu-server/VMID.pid`` names, or None.

        Read bounded, and only a plain number counts: a pid file of any other shape
        names no process (we never guess). The process may be any program; see
        :meth:`vm_pid` for "is a QEMU".
        """
        path = self.qemu_run_dir / f"{vmid}.pid"
        try:
            with open(path, "rb") as f:
                text = f.read(_MAX_PIDFILE + 1)
        except OSError:
            return None
        if len(text) > _MAX_PIDFILE or not re.fullmatch(rb"\s*[0-9]{1,9}\s*", text):
            return None
        pid = int(text)
        # process_start_time is None for a gone process and for a zombie (a VM
        # killed with its dead parent may linger as one until it is reaped).
        if pid <= 1 or process_start_time(pid) is None:
            return None
        return pid

    def vm_pid(self, vmid: int) -> int | None:
        """The PID of VM ``vmid``'s running QEMU, or None.

        ``VMID.pid`` must name a live process that is a QEMU: a stale pid file
        whose number the kernel gave to another program does not make a VM run.
        """
        pid = self.pidfile_pid(vmid)
        if pid is None:
            return None
        try:
            comm = Path(f"/proc/{pid}/comm").read_text(encoding="utf-8", errors="replace")
        except OSError:
            return None
        return pid if comm.startswith(("qemu", "kvm")) else None

    def running_marker(self, vmid: int) -> Path:
        """A container is treated as running while this file exists (the host's stand-in
        for a live container: it is then copied first, like vzdump's suspend mode).
        """
        return self.run_dir / "running" / str(vmid)

    def is_running(self, vmid: int) -> bool:
        """A VM runs when its pid file names a live QEMU; a container per its marker."""
        if self.config_path(vmid, GuestType.QEMU).exists():
            return self.vm_pid(vmid) is not None
        return self.running_marker(vmid).exists()

    def list_guests(self) -> list[tuple[int, GuestType]]:
        """Every guest with a config, sorted by vmid."""
        found: list[tuple[int, GuestType]] = []
        for vmtype in (GuestType.QEMU, GuestType.LXC):
            folder = self.config_path(0, vmtype).parent
            if not folder.is_dir():
                continue
            for child in folder.iterdir():
                stem, dot, ext = child.name.partition(".")
                if dot and ext == "conf" and stem.isdigit():
                    found.append((int(stem), vmtype))
        return sorted(found)

    def guest_type(self, vmid: int) -> GuestType | None:
        """The type of guest ``vmid``, or ``None`` when there is none.

        :raises GuestConfigError: both a VM and a container config exist.
        """
        types = [t for t in (GuestType.QEMU, GuestType.LXC) if self.config_path(vmid, t).exists()]
        if len(types) > 1:
            raise GuestConfigError(
                f"vmid {vmid} has both a VM and a container config",
                path=str(self.config_path(vmid, GuestType.LXC)),
            )
        return types[0] if types else None

    def load_guest(self, vmid: int, vmtype: GuestType | None = None) -> GuestConfig:
        """Read and parse the config of guest ``vmid``.

        :raises GuestNotFoundError: no config for that vmid.
        :raises GuestConfigError: the config is malformed or unreadable.
        """
        vmtype = vmtype or self.guest_type(vmid)
        if vmtype is None:
            raise GuestNotFoundError(f"no guest with vmid {vmid}")
        path = self.config_path(vmid, vmtype)
        try:
            text = safefs.read_file_path(path, limit=safefs.MAX_CONFIG_FILE_SIZE).decode("utf-8")
        except FileNotFoundError as exc:
            raise GuestNotFoundError(f"no guest with vmid {vmid}") from exc
        except (OSError, UnicodeDecodeError, UnsafeStorageError) as exc:
            raise GuestConfigError(f"cannot read: {exc}", path=str(path)) from exc
        return parse_guest_config(text, vmid, vmtype, where=str(path))
