"""The id map of a container, from the raw ``pct.conf`` the merged API passes.

The merged API's ``backup_container`` gives the provider the container's
configuration as text and ``backup-user-id``; the seed's ``backup_directory``
wants the id map. The map is what the configuration says: its ``lxc.idmap``
lines, else Proxmox VE's default for an unprivileged container, else none
(privileged). Only the main section counts (snapshot sections ``[name]`` follow
it and describe older states).
"""

from __future__ import annotations

from pvebackup.api.errors import GuestConfigError
from pvebackup.api.idmap import DEFAULT_UNPRIVILEGED_MAP, parse_lxc_idmap
from pvebackup.api.types import IdMapEntry

__all__ = ["container_id_map"]


def container_id_map(config: str, vmid: int) -> list[IdMapEntry]:
    """The id map of container ``vmid`` described by ``config``.

    :raises GuestConfigError: an ``lxc.idmap`` line is malformed.
    """
    where = f"pct.conf of {vmid}"
    unprivileged = False
    explicit: list[IdMapEntry] = []
    for number, line in enumerate(config.splitlines(), 1):
        text = line.strip()
        if text.startswith("["):
            break
        if not text or text.startswith("#"):
            continue
        key, sep, value = text.partition(":")
        if not sep:
            continue
        key, value = key.strip(), value.strip()
        if key == "unprivileged":
            unprivileged = value == "1"
        elif key == "lxc.idmap":
            try:
                explicit.append(parse_lxc_idmap(value))
            except ValueError as exc:
                raise GuestConfigError(str(exc), path=where, line=number) from exc
    if explicit:
        return explicit
    return list(DEFAULT_UNPRIVILEGED_MAP) if unprivileged else []


def root_host_uid(id_map: list[IdMapEntry]) -> int:
    """The host uid of the container's root (0 for a privileged container)."""
    for entry in id_map:
        if entry.kind == "u" and entry.ct_start <= 0 < entry.ct_start + entry.count:
            return entry.host_start - entry.ct_start
    return 0
