"""A restored guest's identity on the network and to its OS: MACs, SMBIOS uuid, vmgenid.

As qemu-server's ``restore_update_config_line`` (qmrestore) and pve-container's
restore (``pct restore``):

* ``vmgenid`` (VMs) is always regenerated unless it is ``0`` (disabled): a restored
  VM is a new generation, so that the guest OS invalidates what a clone must not
  reuse (its Active Directory replication state, random seeds).
* with ``unique``: every ``netN`` gets a new MAC (the ``MODEL=MAC`` or ``macaddr=``
  part of a VM's, ``hwaddr=`` of a container's), only where one was set, and a
  VM's ``smbios1`` a new ``uuid``.

A new MAC is ``PVE::Tools::random_ether_addr``'s: six random bytes with the
multicast bit cleared and the locally administered bit set, upper case, whose
first characters are then replaced by ``mac_prefix`` of ``datacenter.cfg``
(default ``BC:24:11``, the OUI the IEEE assigned to Proxmox; with it the address
is a globally administered one of that block, as on Proxmox VE).
"""

from __future__ import annotations

import re
import secrets
import uuid
from collections.abc import Callable, Iterable

from pvebackup.api.errors import UnsafeStorageError
from pvebackup.kit import safefs

from .guests import GuestConfig, NodeRoot

__all__ = [
    "PROXMOX_OUI",
    "identity_replacements",
    "mac_addresses",
    "mac_prefix",
    "random_ether_addr",
    "shared_macs",
]

PROXMOX_OUI = "BC:24:11"
# pve-cluster's mac-prefix format: up to three octets, the first one unicast.
_PREFIX = re.compile(r"^[a-f0-9][02468ace](?::[a-f0-9]{2}){0,2}:?$", re.IGNORECASE)
_MAC = re.compile(r"^[0-9a-f]{2}(?::[0-9a-f]{2}){5}$", re.IGNORECASE)
_NET = re.compile(r"^net\d+$")
# The MAC-carrying keys of a net property string: qemu-server's NIC models
# (written MODEL=MAC) and macaddr=, pve-container's hwaddr=.
_MAC_KEYS = frozenset(
    (
        "macaddr", "hwaddr", "virtio", "e1000", "e1000-82540em", "e1000-82544gc",
        "e1000-82545em", "e1000e", "i82551", "i82557b", "i82559er", "ne2k_isa", "ne2k_pci",
        "pcnet", "rtl8139", "vmxnet3",
    )
)


def random_ether_addr(
    prefix: str = PROXMOX_OUI, randbytes: Callable[[int], bytes] = secrets.token_bytes
) -> str:
    raw = bytearray(randbytes(6))
    raw[0] = (raw[0] & 0xFE) | 0x02  # unicast, locally administered
    addr = ":".join(f"{b:02X}" for b in raw)
    return prefix.upper() + addr[len(prefix) :]


def mac_prefix(root: NodeRoot, warn: Callable[[str], None]) -> str:
    """``mac_prefix`` of ``ROOT/etc/pve/datacenter.cfg``, else Proxmox's OUI."""
    path = root.pve_dir / "datacenter.cfg"
    try:
        text = safefs.read_file_path(path, limit=safefs.MAX_CONFIG_FILE_SIZE).decode("utf-8")
    except FileNotFoundError:
        return PROXMOX_OUI
    except (OSError, UnicodeDecodeError, UnsafeStorageError) as exc:
        warn(f"{path}: cannot read ({exc}); MAC prefix {PROXMOX_OUI}")
        return PROXMOX_OUI
    for line in text.splitlines():
        key, sep, value = line.strip().partition(":")
        if sep and key.strip() == "mac_prefix":
            value = value.strip()
            if _PREFIX.match(value):
                return value
            # PVE drops a malformed value with a warning and uses the default.
            warn(f"{path}: mac_prefix {value[:40]!r} is malformed; using {PROXMOX_OUI}")
    return PROXMOX_OUI


def _net_parts(value: str) -> list[tuple[str, str]]:
    return [(k, v) for k, _, v in (p.partition("=") for p in value.split(","))]


def mac_addresses(config: GuestConfig) -> set[str]:
    """The MAC addresses of ``config``'s network devices, upper case."""
    found: set[str] = set()
    for entry in config.entries:
        if _NET.match(entry.key):
            for key, value in _net_parts(entry.value):
                if key in _MAC_KEYS and _MAC.match(value):
                    found.add(value.upper())
    return found


def identity_replacements(
    config: GuestConfig,
    *,
    unique: bool,
    prefix: str = PROXMOX_OUI,
    new_mac: Callable[[str], str] = random_ether_addr,
    new_uuid: Callable[[], str] = lambda: str(uuid.uuid4()),
) -> dict[str, str]:
    """The config lines to replace (key -> new value) for a restore, as qmrestore."""
    replace: dict[str, str] = {}
    for entry in config.entries:
        if entry.key == "vmgenid" and entry.value.strip() != "0":
            replace[entry.key] = new_uuid()
        elif unique and _NET.match(entry.key):
            parts = entry.value.split(",")
            renewed = [_renew(part, prefix, new_mac) for part in parts]
            if renewed != parts:
                replace[entry.key] = ",".join(renewed)
        elif unique and entry.key == "smbios1":
            parts = [p for p in entry.value.split(",") if p and not p.startswith("uuid=")]
            replace[entry.key] = ",".join([f"uuid={new_uuid()}", *parts])
    return replace


def _renew(part: str, prefix: str, new_mac: Callable[[str], str]) -> str:
    key, sep, value = part.partition("=")
    if sep and key in _MAC_KEYS and _MAC.match(value):
        return f"{key}={new_mac(prefix)}"
    return part


def shared_macs(
    root: NodeRoot, vmid: int, macs: Iterable[str]
) -> dict[int, set[str]]:
    """Other guests of the node (not ``vmid``) that use one of ``macs``."""
    wanted = {m.upper() for m in macs}
    clashes: dict[int, set[str]] = {}
    if not wanted:
        return clashes
    for other, vmtype in root.list_guests():
        if other == vmid:
            continue
        try:
            both = mac_addresses(root.load_guest(other, vmtype)) & wanted
        except Exception:  # another guest's broken config is not this restore's problem
            continue
        if both:
            clashes[other] = both
    return clashes
