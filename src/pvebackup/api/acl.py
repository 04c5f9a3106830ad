"""POSIX ACLs as the kernel stores them in ``system.posix_acl_*`` xattrs.

Named user and group entries carry ids, so restoring an ACL into a container with
another id map must rewrite them, and the kernel wants the entries sorted again
afterwards. GNU tar ``--acls`` writes the text form (``SCHILY.acl.access``) next
to the raw xattr; :func:`acl_to_text` and :func:`acl_text_to_xattr` convert between
the two. Providers map ids from host to container ids when they back up, the host
maps them back when it restores: both use this one codec, which is why it lives in
``api``.

Raw layout (little endian): a u32 version (2), then per entry u16 tag, u16 perm,
u32 id, where the id is 0xFFFFFFFF for entries that name no user or group.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

__all__ = [
    "ACL_XATTRS",
    "acl_ids",
    "acl_text_to_xattr",
    "acl_to_text",
    "map_acl_xattr",
]

ACL_XATTRS = ("system.posix_acl_access", "system.posix_acl_default")

_HEADER = struct.Struct("<I")
_ENTRY = struct.Struct("<HHI")
_VERSION = 2
_UNDEFINED_ID = 0xFFFFFFFF

_USER_OBJ = 0x01
_USER = 0x02
_GROUP_OBJ = 0x04
_GROUP = 0x08
_MASK = 0x10
_OTHER = 0x20

_TEXT_TAGS = {
    ("user", False): _USER_OBJ,
    ("user", True): _USER,
    ("group", False): _GROUP_OBJ,
    ("group", True): _GROUP,
    ("mask", False): _MASK,
    ("other", False): _OTHER,
}


def _parse(value: bytes) -> list[tuple[int, int, int]]:
    if len(value) < _HEADER.size or (len(value) - _HEADER.size) % _ENTRY.size:
        raise ValueError(f"malformed POSIX ACL xattr of {len(value)} bytes")
    (version,) = _HEADER.unpack_from(value)
    if version != _VERSION:
        raise ValueError(f"unknown POSIX ACL xattr version {version}")
    return [_ENTRY.unpack_from(value, off) for off in range(_HEADER.size, len(value), _ENTRY.size)]


def _encode(entries: list[tuple[int, int, int]]) -> bytes:
    # The kernel accepts only entries ordered by tag, then by id.
    entries = sorted(entries, key=lambda e: (e[0], e[2]))
    return _HEADER.pack(_VERSION) + b"".join(_ENTRY.pack(*e) for e in entries)


def map_acl_xattr(
    value: bytes, map_uid: Callable[[int], int], map_gid: Callable[[int], int]
) -> bytes:
    """Rewrite the ids of named user/group entries of a raw ACL xattr.

    Raises ``ValueError`` for a malformed value or whatever the map functions raise.
    """
    out = []
    for tag, perm, ident in _parse(value):
        if tag == _USER:
            ident = map_uid(ident)
        elif tag == _GROUP:
            ident = map_gid(ident)
        out.append((tag, perm, ident))
    return _encode(out)


def acl_ids(value: bytes) -> list[tuple[str, int]]:
    """The named entries of a raw ACL as ``("u"|"g", id)``, for comparisons."""
    return [
        ("u" if tag == _USER else "g", ident)
        for tag, _perm, ident in _parse(value)
        if tag in (_USER, _GROUP)
    ]


def acl_text_to_xattr(text: str) -> bytes:
    """Convert the text form (``user::rw-\\nuser:1000:r--\\n...``) to the raw xattr.

    Entries are separated by newlines or commas; ``#`` starts a comment. Only
    numeric ids are accepted: names would have to be looked up in the container's
    user database, which the host does not read. Raises ``ValueError``.
    """
    entries: list[tuple[int, int, int]] = []
    for raw in text.replace(",", "\n").splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        fields = line.split(":")
        if len(fields) != 3:
            raise ValueError(f"malformed ACL entry {line!r}")
        kind, qualifier, perms = (f.strip() for f in fields)
        kind = {"u": "user", "g": "group", "m": "mask", "o": "other"}.get(kind, kind)
        tag = _TEXT_TAGS.get((kind, bool(qualifier)))
        if tag is None:
            raise ValueError(f"malformed ACL entry {line!r}")
        if qualifier and not qualifier.isdigit():
            raise ValueError(f"ACL entry {line!r} names a user or group, not a numeric id")
        if len(perms) != 3 or any(p not in (c, "-") for p, c in zip(perms, "rwx", strict=True)):
            raise ValueError(f"malformed ACL permissions in {line!r}")
        perm = sum(bit for p, bit in zip(perms, (4, 2, 1), strict=True) if p != "-")
        entries.append((tag, perm, int(qualifier) if qualifier else _UNDEFINED_ID))
    if not entries:
        raise ValueError("empty ACL")
    return _encode(entries)


_TAG_NAMES = {tag: kind for (kind, _named), tag in _TEXT_TAGS.items()}


def acl_to_text(value: bytes) -> str:
    """GNU tar's text form: ``user::rw-,user:1000:r--,group::r--,mask::r--,other::---``.

    Named entries carry numeric ids (archives are restored with ``--numeric-owner``;
    names would mean the host's users, not the container's). Raises ``ValueError``.
    """
    parts = []
    for tag, perm, ident in _parse(value):
        qualifier = str(ident) if tag in (_USER, _GROUP) else ""
        bits = "".join(ch if perm & bit else "-" for ch, bit in (("r", 4), ("w", 2), ("x", 1)))
        parts.append(f"{_TAG_NAMES.get(tag, 'unknown')}:{qualifier}:{bits}")
    return ",".join(parts)
