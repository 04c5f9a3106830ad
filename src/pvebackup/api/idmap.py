"""uid/gid mapping between a container's user namespace and the host.

An unprivileged container sees its ids through ``lxc.idmap`` ranges: with the
default ``u 0 100000 65536`` / ``g 0 100000 65536`` a file owned by host uid 100033
belongs to uid 33 inside the container. ``backup_directory`` hands the provider a
directory with *host* ids plus the id map; a provider stores *container* ids
(``host_to_ct_*``) so that the backup restores into any container with any map.
A restore maps back with ``ct_to_host_*`` for the target container's map.

Direction rules:

- An empty map is a privileged container: both directions are the identity.
- ``host_to_ct_*`` of a host id outside every range gives :data:`OVERFLOW_ID`
  (65534): that is what the container itself sees for such a file
  (``/proc/sys/kernel/overflowuid``), so a backup records it as ``nobody``.
- ``ct_to_host_*`` of a container id outside every range raises ``ValueError``:
  the target container cannot own such a file, and the caller decides what to do.
- A non-empty map with no range of one kind maps no id of that kind.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

from pvebackup.api.types import IdMapEntry

__all__ = ["DEFAULT_UNPRIVILEGED_MAP", "OVERFLOW_ID", "IdMapper", "parse_lxc_idmap"]

OVERFLOW_ID = 65534
"""The id the kernel shows for an unmapped id (``nobody`` / ``nogroup``)."""

DEFAULT_UNPRIVILEGED_MAP: tuple[IdMapEntry, ...] = (
    IdMapEntry("u", 0, 100000, 65536),
    IdMapEntry("g", 0, 100000, 65536),
)
"""Proxmox VE's map for an unprivileged container without ``lxc.idmap`` lines."""


def parse_lxc_idmap(value: str) -> IdMapEntry:
    """Parse one ``lxc.idmap`` value such as ``"u 0 100000 65536"``.

    A leading ``lxc.idmap:`` or ``lxc.idmap =`` (as in a container config line) is
    accepted. Raises ``ValueError`` with the offending text for anything else.
    """
    text = value.strip()
    for sep in (":", "="):
        head, found, tail = text.partition(sep)
        if found and head.strip() == "lxc.idmap":
            text = tail.strip()
            break
    fields = text.split()
    if len(fields) != 4 or fields[0] not in ("u", "g"):
        raise ValueError(f"invalid lxc.idmap value {value!r}: expected 'u|g CT HOST COUNT'")
    try:
        ct_start, host_start, count = (int(f, 10) for f in fields[1:])
    except ValueError as exc:
        raise ValueError(f"invalid lxc.idmap value {value!r}: ids must be integers") from exc
    if max(ct_start + count, host_start + count) > 2**32:
        raise ValueError(f"invalid lxc.idmap value {value!r}: range beyond 2^32")
    return IdMapEntry(fields[0], ct_start, host_start, count)


def _check_disjoint(side: str, ordered: list[tuple[int, IdMapEntry]]) -> None:
    for (prev_start, prev), (cur_start, cur) in zip(ordered, ordered[1:], strict=False):
        if prev_start + prev.count > cur_start:
            raise ValueError(
                f"overlapping {side} ranges in id map: "
                f"{' '.join(prev.as_list())} and {' '.join(cur.as_list())}"
            )


class _Ranges:
    """The ranges of one kind, sorted by one side, for lookups in both directions."""

    def __init__(self, entries: list[IdMapEntry]) -> None:
        self.by_ct = sorted(entries, key=lambda e: e.ct_start)
        self.by_host = sorted(entries, key=lambda e: e.host_start)
        self._ct_starts = [e.ct_start for e in self.by_ct]
        self._host_starts = [e.host_start for e in self.by_host]
        _check_disjoint("container", [(e.ct_start, e) for e in self.by_ct])
        _check_disjoint("host", [(e.host_start, e) for e in self.by_host])

    def to_host(self, ct_id: int) -> int | None:
        i = bisect.bisect_right(self._ct_starts, ct_id) - 1
        if i >= 0:
            e = self.by_ct[i]
            if ct_id < e.ct_start + e.count:
                return e.host_start + (ct_id - e.ct_start)
        return None

    def to_ct(self, host_id: int) -> int | None:
        i = bisect.bisect_right(self._host_starts, host_id) - 1
        if i >= 0:
            e = self.by_host[i]
            if host_id < e.host_start + e.count:
                return e.ct_start + (host_id - e.host_start)
        return None


class IdMapper:
    """Map uids and gids between a container and the host (see the module doc).

    ``id_map`` may be the seed's lists exactly as ``backup_directory`` receives
    them (``[["u", "0", "100000", "65536"], ...]``) or :class:`IdMapEntry` values.
    Raises ``ValueError`` for a malformed entry, or when two ranges of one kind
    overlap on the container side or on the host side.
    """

    def __init__(self, id_map: Sequence[IdMapEntry | Sequence[str]]) -> None:
        self.id_map: tuple[IdMapEntry, ...] = tuple(IdMapEntry.from_seed(e) for e in id_map)
        self._uids = _Ranges([e for e in self.id_map if e.kind == "u"])
        self._gids = _Ranges([e for e in self.id_map if e.kind == "g"])

    @property
    def is_identity(self) -> bool:
        """True for a privileged container (an empty map)."""
        return not self.id_map

    def __repr__(self) -> str:
        return f"IdMapper({[' '.join(e.as_list()) for e in self.id_map]!r})"

    def _to_ct(self, ranges: _Ranges, host_id: int) -> int:
        if self.is_identity:
            return host_id
        ct_id = ranges.to_ct(host_id)
        return OVERFLOW_ID if ct_id is None else ct_id

    def _to_host(self, ranges: _Ranges, ct_id: int, what: str) -> int:
        if self.is_identity:
            return ct_id
        host_id = ranges.to_host(ct_id)
        if host_id is None:
            raise ValueError(f"container {what} {ct_id} is not mapped by the id map")
        return host_id

    def host_to_ct_uid(self, uid: int) -> int:
        """The container's uid for host ``uid``; :data:`OVERFLOW_ID` if unmapped."""
        return self._to_ct(self._uids, uid)

    def host_to_ct_gid(self, gid: int) -> int:
        """The container's gid for host ``gid``; :data:`OVERFLOW_ID` if unmapped."""
        return self._to_ct(self._gids, gid)

    def ct_to_host_uid(self, uid: int) -> int:
        """The host uid for container ``uid``; ``ValueError`` if unmapped."""
        return self._to_host(self._uids, uid, "uid")

    def ct_to_host_gid(self, gid: int) -> int:
        """The host gid for container ``gid``; ``ValueError`` if unmapped."""
        return self._to_host(self._gids, gid, "gid")
