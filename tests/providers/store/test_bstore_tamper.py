"""backup-store: a same-length change to a stored config is reported, typed (exit 5)."""

from __future__ import annotations

from pathlib import Path

import pytest
from bstore_support import FakeHost, mixed_image

from pvebackup.api.errors import IntegrityError

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("name", ["guest.conf", "firewall.fw"])
def test_flipped_byte_in_a_stored_config_is_reported(
    host: FakeHost, tmp_path: Path, name: str
) -> None:
    volname, _ = host.backup(mixed_image(tmp_path / "src.qcow2"))
    p = host.provider()
    assert "memory: 512" in p.extract_guest_config(volname, host.storeid)
    (stored,) = (tmp_path / "store/snapshots").rglob(name)
    data = bytearray(stored.read_bytes())
    data[-3] ^= 0x01  # plain store, small file: stored uncompressed, same length
    stored.write_bytes(bytes(data))
    extract = p.extract_guest_config if name == "guest.conf" else p.extract_firewall_config
    with pytest.raises(IntegrityError, match="does not match the manifest") as err:
        extract(volname, host.storeid)
    assert err.value.exit_code == 5
