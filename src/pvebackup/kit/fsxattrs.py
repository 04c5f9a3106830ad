"""Extended attributes and POSIX ACLs of one file, with ids in the container's view.

Files in the directory the host hands over are owned by *host* ids (container
root is e.g. 100000). Ownership is stored as container ids, and so are the ids
inside POSIX ACLs: the named ``user:``/``group:`` entries of the raw
``system.posix_acl_access``/``system.posix_acl_default`` values are rewritten
with the same reverse mapping. The archive also stores ACLs in the text form
GNU tar and star use (``SCHILY.acl.access``), built from the raw value.

The ACL codec itself is :mod:`pvebackup.api.acl`, shared with the host's restore.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Sequence
from typing import Protocol

from pvebackup.api.acl import ACL_XATTRS, acl_to_text, map_acl_xattr
from pvebackup.api.errors import UsageError
from pvebackup.api.idmap import IdMapper

__all__ = [
    "ACL_XATTRS",
    "ContainerIds",
    "IdTranslator",
    "acl_to_text",
    "map_acl_ids",
    "read_xattrs",
]


class IdTranslator(Protocol):
    """Maps one uid or gid (host ids to container ids, or the reverse)."""

    def uid(self, uid: int) -> int: ...

    def gid(self, gid: int) -> int: ...


def map_acl_ids(raw: bytes, ids: IdTranslator) -> bytes:
    """The raw ACL value with the ids of named user and group entries mapped."""
    return map_acl_xattr(raw, ids.uid, ids.gid)


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

    def __init__(self, id_map: Sequence[Sequence[str]]) -> None:
        try:
            self._mapper = IdMapper(id_map)
        except ValueError as exc:
            raise UsageError(f"backup_directory: unusable id map: {exc}") from exc

    def uid(self, uid: int) -> int:
        return self._mapper.host_to_ct_uid(uid)

    def gid(self, gid: int) -> int:
        return self._mapper.host_to_ct_gid(gid)
