"""The storage.cfg properties that configure the Proxmox VE bridge for a storage.

A node's vzdump reaches our providers through the Perl plugins and the helper
(``pvebackup.bridge``, ``docs/proxmox-ve.md``); what it is asked can only come from
storage.cfg there, so the bridge's choices are properties of the storage, which
every built-in backup type accepts (and ignores when not bridged):

- ``vm-mechanism``: what ``backup_get_mechanism`` answers for VMs: ``nbd`` (the
  default: qemu-server hands over an NBD export) or ``file-handle`` (qemu-server
  exposes the export as a file through ``nbdfuse`` and passes its handle).
"""

from __future__ import annotations

from collections.abc import Mapping

from pvebackup.storage.properties import PropertyKind, PropertySpec

__all__ = ["BRIDGE_PROPERTIES", "VM_MECHANISMS"]

VM_MECHANISMS = ("nbd", "file-handle")

BRIDGE_PROPERTIES: Mapping[str, PropertySpec] = {
    "vm-mechanism": PropertySpec(
        PropertyKind.ENUM,
        choices=VM_MECHANISMS,
        default="nbd",
        description="Proxmox VE bridge: how vzdump hands VM disks over: nbd (default) "
        "or file-handle (through nbdfuse)",
    ),
}
"""The bridge's properties, shared by ``backup-dir`` and ``backup-store``."""
