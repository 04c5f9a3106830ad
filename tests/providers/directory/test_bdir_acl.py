"""ACL id mapping (pure units); pacing and progress are tested in tests/kit."""

from __future__ import annotations

import struct

from pvebackup.kit.fsxattrs import acl_to_text, map_acl_ids


class Shift:
    def uid(self, uid: int) -> int:
        return uid - 100000

    def gid(self, gid: int) -> int:
        return gid - 200000


def raw_acl(*entries: tuple[int, int, int]) -> bytes:
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)


def test_acl_ids_are_mapped_and_rendered() -> None:
    undefined = 0xFFFFFFFF
    raw = raw_acl(
        (0x01, 6, undefined),  # user::rw-
        (0x02, 4, 101000),  # user:101000:r--
        (0x04, 4, undefined),  # group::r--
        (0x08, 5, 200042),  # group:200042:r-x
        (0x10, 5, undefined),  # mask::r-x
        (0x20, 0, undefined),  # other::---
    )
    mapped = map_acl_ids(raw, Shift())
    assert acl_to_text(mapped) == (
        "user::rw-,user:1000:r--,group::r--,group:42:r-x,mask::r-x,other::---"
    )
    assert len(mapped) == len(raw)
