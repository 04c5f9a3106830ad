"""The POSIX ACL xattr codec shared by providers (backup) and the host (restore)."""

from __future__ import annotations

import pytest

from pvebackup.api.acl import acl_ids, acl_text_to_xattr, acl_to_text, map_acl_xattr

TEXT = "user::rw-,user:1000:r--,group::r--,group:33:rwx,mask::rwx,other::---"


def test_text_and_raw_round_trip() -> None:
    assert acl_to_text(acl_text_to_xattr(TEXT)) == TEXT


def test_mapping_rewrites_named_entries_and_keeps_kernel_order() -> None:
    raw = acl_text_to_xattr(TEXT)
    to_host = map_acl_xattr(raw, lambda u: u + 100000, lambda g: g + 100000)
    assert acl_ids(to_host) == [("u", 101000), ("g", 100033)]
    # ids that swap order are sorted again (the kernel rejects unsorted entries)
    two = acl_text_to_xattr("user::rw-,user:1:r--,user:2:r--,group::r--,mask::r--,other::---")
    swapped = map_acl_xattr(two, lambda u: 3 - u, lambda g: g)
    assert acl_ids(swapped) == [("u", 1), ("u", 2)]
    assert map_acl_xattr(to_host, lambda u: u - 100000, lambda g: g - 100000) == raw


@pytest.mark.parametrize("bad", [b"", b"\x02\x00\x00\x00\x01", b"\x03\x00\x00\x00"])
def test_malformed_values_are_refused(bad: bytes) -> None:
    with pytest.raises(ValueError):
        map_acl_xattr(bad, int, int)
    with pytest.raises(ValueError):
        acl_to_text(bad)


def test_names_instead_of_ids_are_refused() -> None:
    with pytest.raises(ValueError, match="numeric"):
        acl_text_to_xattr("user::rw-,user:alice:r--,group::r--,mask::r--,other::---")
