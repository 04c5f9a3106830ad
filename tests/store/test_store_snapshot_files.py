"""Snapshot files are checked against the manifest's SHA-256, not only their length.

In a plain store a small blob is stored uncompressed and unauthenticated: the
blob codec accepts any same-length change, so only the manifest's checksum can
tell that a stored config was altered.
"""

from __future__ import annotations

import pytest

from pvebackup.api.errors import CorruptIndexError, IntegrityError
from pvebackup.api.types import GuestType
from pvebackup.store.backends.memory import MemoryBackend
from pvebackup.store.datastore import Datastore
from pvebackup.store.snapshot import SnapshotId

CONF = b"name: vm\nmemory: 512\n"
FW = b"[OPTIONS]\nenable: 1\n"


@pytest.mark.parametrize(("name", "content"), [("guest.conf", CONF), ("firewall.fw", FW)])
def test_same_length_flip_in_a_stored_file_is_reported(name: str, content: bytes) -> None:
    store = Datastore.create(MemoryBackend(), chunk_size=65536)
    sid = SnapshotId(GuestType.QEMU, 100, 1000)
    writer = store.new_snapshot(sid)
    writer.add_file("guest.conf", CONF)
    writer.add_file("firewall.fw", FW)
    writer.commit()
    key = sid.prefix + name
    stored = bytearray(store.backend.get(key))
    assert stored.endswith(content)  # stored as is: nothing but the manifest checks it
    stored[-2] ^= 0x01  # "512" -> "513", "1" -> "0": same length
    store.backend.put(key, bytes(stored), overwrite=True)
    assert store.codec.decode(bytes(stored)) != content  # the codec alone accepts it
    snap = store.open_snapshot(sid)
    with pytest.raises(CorruptIndexError, match=f"{name} does not match the manifest") as err:
        snap.read_file(name)
    assert isinstance(err.value, IntegrityError) and err.value.exit_code == 5
