"""Extended attributes and POSIX ACLs of one file, with ids in the container's view.

Files in the directory the host hands over are owned by *host* ids (container
root is e.g. 100000). Ownership is stored as container ids, and so are the ids
inside POSIX ACLs: the named ``user:``/``group:`` entries of the raw
``system.posix_acl_access``/``system.posix_acl_default`` values are rewritten
with the same reverse mapping. The archive also stores ACLs in the text form
GNU tar and star use (``SCHILY.acl.access``), built from the raw value.

Raw ACL xattr layout (Linux ``posix_acl_xattr.h``), little endian: a 4-byte
version (2), then 8-byte entries ``tag:u16 perm:u16 id:u32``.
"""

from __future__ import annotations

import errno
import os
import struct
from collections.abc import Sequence
from typing import Protocol

from pvebackup.api.idmap import IdMapper
from pvebackup.api.types import IdMapEntry

__all__ = [
    "ACL_XATTRS",
    "ContainerIds",
    "IdTranslator",
    "acl_to_text",
    "map_acl_ids",
    "read_xattrs",
]

ACL_XATTRS = ("system.posix_acl_access", "system.posix_acl_default")
_HEADER = struct.Struct("<I")
_ENTRY = struct.Struct("<HHI")
_VERSION = 2
_USER_OBJ, _USER, _GROUP_OBJ, _GROUP, _MASK, _OTHER = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20
_TAG_NAMES = {
    _USER_OBJ: "user",
    _USER: "user",
    _GROUP_OBJ: "group",
    _GROUP: "group",
    _MASK: "mask",
    _OTHER: "other",
}


class IdTranslator(Protocol):
    """Maps one uid or gid (host ids to container ids, or the reverse)."""

    def uid(self, uid: int) -> int: ...

    def gid(self, gid: int) -> int: ...


def _entries(raw: bytes) -> list[tuple[int, int, int]]:
    if len(raw) < _HEADER.size or (len(raw) - _HEADER.size) % _ENTRY.size:
        raise ValueError(f"malformed POSIX ACL xattr of {len(raw)} bytes")
    (version,) = _HEADER.unpack_from(raw)
    if version != _VERSION:
        raise ValueError(f"unknown POSIX ACL xattr version {version}")
    return [entry for entry in _ENTRY.iter_unpack(raw[_HEADER.size :])]


def map_acl_ids(raw: bytes, ids: IdTranslator) -> bytes:
    """The raw ACL value with the ids of named user and group entries mapped."""
    out = [_HEADER.pack(_VERSION)]
    for tag, perm, ident in _entries(raw):
        if tag == _USER:
            ident = ids.uid(ident)
        elif tag == _GROUP:
            ident = ids.gid(ident)
        out.append(_ENTRY.pack(tag, perm, ident))
    return b"".join(out)


def acl_to_text(raw: bytes) -> str:
    """GNU tar's text form: ``user::rw-,user:1000:r--,group::r--,mask::r--,other::---``.

    Named entries carry numeric ids (the archive is restored with
    ``--numeric-owner``; names would mean the host's, not the container's users).
    """
    parts = []
    for tag, perm, ident in _entries(raw):
        qualifier = str(ident) if tag in (_USER, _GROUP) else ""
        bits = "".join(ch if perm & bit else "-" for ch, bit in (("r", 4), ("w", 2), ("x", 1)))
        parts.append(f"{_TAG_NAMES.get(tag, 'unknown')}:{qualifier}:{bits}")
    return ",".join(parts)


def read_xattrs(path: str, ids: IdTranslator) -> dict[str, bytes]:
    """All xattrs of ``path`` (not following symlinks), ACL ids mapped with ``ids``.

    A file system without xattr support yields ``{}``.
    """
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            return {}
        raise
    values = {}
    for name in sorted(names):
        try:
            value = os.getxattr(path, name, follow_symlinks=False)
        except OSError as exc:
            if exc.errno == errno.ENODATA:  # removed meanwhile
                continue
            raise
        values[name] = map_acl_ids(value, ids) if name in ACL_XATTRS else value
    return values


class ContainerIds:
    """Host ids to container ids through the reverse of the container's ``id_map``.

    Host ids outside the map become 65534 (nobody/nogroup), as inside the
    container's user namespace.
    """

    def __init__(self, id_map: Sequence[IdMapEntry]) -> None:
        self._mapper = IdMapper(id_map)

    def uid(self, uid: int) -> int:
        return self._mapper.host_to_ct_uid(uid)

    def gid(self, gid: int) -> int:
        return self._mapper.host_to_ct_gid(gid)
