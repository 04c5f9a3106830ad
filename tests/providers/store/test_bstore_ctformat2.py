"""backup-store container archive format 2: CDC, aligned file data, sparse files,
the catalog, the directory mechanism, and format-1 archives still restoring."""

from __future__ import annotations

import os
import subprocess
import tarfile
import tempfile
import time
from pathlib import Path

import pytest
from bstore_support import FakeHost

from pvebackup.api.errors import CorruptChunkError, CorruptIndexError
from pvebackup.api.types import GuestType, RestoreMechanism
from pvebackup.kit.paxtar import write_pax_stream
from pvebackup.providers.store.catalog import ALIGNED, CATALOG_MAGIC, SPARSE, parse_catalog
from pvebackup.providers.store.ctarchive import ARCHIVE_DEVICE, read_catalog
from pvebackup.providers.store.provider import BackupStoreProvider
from pvebackup.store.dynindex import DynamicIndex
from pvebackup.store.pack import pack_key

pytestmark = pytest.mark.e2e

MiB = 1 << 20
ID_MAP = [["u", "0", "100000", "65536"], ["g", "0", "100000", "65536"]]


def _tree(root: Path) -> Path:
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "hostname").write_text("ct101\n")
    (root / "a-small").write_bytes(os.urandom(3000))
    (root / "big").write_bytes(os.urandom(3 * MiB))
    with open(root / "sparse", "wb") as f:  # data, 8 MiB hole, data, trailing hole
        f.write(os.urandom(100_000))
        f.seek(8 * MiB)
        f.write(b"middle" * 1000)
        f.truncate(20 * MiB)
    os.link(root / "big", root / "big-link")
    os.symlink("etc/hostname", root / "name")
    return root


def _backup(host: FakeHost, root: Path, scfg: dict[str, str] | None = None) -> str:
    p = host.provider()
    p.job_start(int(time.time()))
    p.backup_start(101, GuestType.LXC)
    volname = p.backup_get_target(101, GuestType.LXC)
    p.backup_guest_config(101, str(host.conf))
    p.backup_directory(101, str(root), ID_MAP, [], ["."], None)
    p.backup_end(101)
    p.job_end()
    time.sleep(1.01)  # snapshot names have a one-second resolution
    return volname


def _stream(p: BackupStoreProvider, volname: str) -> bytes:
    path = p.restore_tar_init(volname, "store1")
    with open(path, "rb") as f:
        data = f.read()
    p.restore_tar_cleanup(volname, "store1")
    return data


def test_file_data_is_chunk_aligned_and_listed(host: FakeHost, tmp_path: Path) -> None:
    root = _tree(tmp_path / "ct")
    volname = _backup(host, root)
    p = host.provider()
    store = p.store()
    snap = store.open_snapshot(store.list_snapshots()[0])
    assert snap.manifest.metadata["ct-archive-format"] == "2"
    index = snap.open_index(ARCHIVE_DEVICE)
    assert isinstance(index, DynamicIndex)
    stream = _stream(p, volname)
    assert "as uncompressed tar" in host.log.text()  # the host is told what it gets
    cat = {e.path: e for e in read_catalog(store, snap)}
    assert set(cat) >= {"", "etc", "etc/hostname", "big", "big-link", "sparse", "name"}
    big = cat["big"]
    assert big.flags & ALIGNED and big.size == 3 * MiB
    # the catalog's offsets find the data in the stream, on chunk boundaries
    assert stream[big.data_offset : big.data_offset + big.size] == (root / "big").read_bytes()
    assert index.is_boundary(big.data_offset) and index.is_boundary(big.data_end)
    assert not cat["a-small"].flags & ALIGNED
    assert cat["big-link"].kind == "1" and cat["big-link"].link == "./big"
    assert cat["etc/hostname"].mtime_ns == os.lstat(root / "etc/hostname").st_mtime_ns
    assert cat["sparse"].flags & SPARSE and cat["sparse"].size == 20 * MiB


def test_change_before_a_big_file_keeps_its_chunks(host: FakeHost, tmp_path: Path) -> None:
    root = _tree(tmp_path / "ct")
    _backup(host, root)
    # Inserting bytes before "big" in the stream shifts it: with fixed-size chunks
    # nothing after the change would dedup.
    (root / "a-small").write_bytes(os.urandom(5555))
    _backup(host, root)
    assert "0 B deduplicated" not in host.log.text()
    line = [m for m in host.log.text().splitlines() if "deduplicated" in m][-1]
    reused = line.split(" new, ")[1].split(" deduplicated")[0]
    assert reused.endswith("MiB") and float(reused.split()[0]) >= 3.0, line


def _check_sparse(restored: Path, original: Path) -> None:
    assert restored.read_bytes() == original.read_bytes()
    assert restored.stat().st_blocks * 512 < 2 * MiB  # the holes came back as holes


def test_sparse_file_holes_not_stored_and_restored_by_gnu_tar(
    host: FakeHost, tmp_path: Path
) -> None:
    root = _tree(tmp_path / "ct")
    volname = _backup(host, root)
    p = host.provider()
    assert "2 sparse files" not in host.log.text() and "1 sparse files" in host.log.text()
    stream = _stream(p, volname)
    assert len(stream) < 8 * MiB  # 20 MiB of sparse file, 3 MiB big file, no holes
    (tmp_path / "a.tar").write_bytes(stream)
    out = tmp_path / "out"
    out.mkdir()
    subprocess.run(["tar", "-xf", str(tmp_path / "a.tar"), "-C", str(out)], check=True)
    _check_sparse(out / "sparse", root / "sparse")
    with tarfile.open(tmp_path / "a.tar") as tar:  # Python reads PAX sparse 1.0 too
        member = tar.getmember("./sparse")
        assert member.size == 20 * MiB and member.issparse()


def test_directory_mechanism_round_trip(host: FakeHost, tmp_path: Path) -> None:
    root = _tree(tmp_path / "ct")
    for path in [root, *root.rglob("*")]:
        os.lchown(path, 100000 + 5, 100000 + 7)
    volname = _backup(host, root)
    host.scfg["ct-restore"] = "directory"
    p = host.provider()
    assert p.restore_get_mechanism(volname, "store1") == (
        RestoreMechanism.DIRECTORY, GuestType.LXC)  # fmt: skip
    out = Path(p.restore_directory_init(volname, "store1"))
    try:
        assert (out.parent.stat().st_mode & 0o777) == 0o700
        _check_sparse(out / "sparse", root / "sparse")
        assert (out / "big").read_bytes() == (root / "big").read_bytes()
        assert os.lstat(out / "big").st_ino == os.lstat(out / "big-link").st_ino
        assert os.readlink(out / "name") == "etc/hostname"
        st = os.lstat(out / "etc/hostname")
        assert (st.st_uid, st.st_gid) == (5, 7)  # container ids
        assert st.st_mtime_ns == os.lstat(root / "etc/hostname").st_mtime_ns
    finally:
        p.restore_directory_cleanup(volname, "store1")
    assert not out.exists()


def test_directory_mechanism_corrupt_chunk_fails(host: FakeHost, tmp_path: Path) -> None:
    volname = _backup(host, _tree(tmp_path / "ct"))
    p = host.provider()
    store = p.store()
    snap = store.open_snapshot(store.list_snapshots()[0])
    cat = {e.path: e for e in read_catalog(store, snap)}
    index = snap.open_index(ARCHIVE_DEVICE)
    victim = index.digest(index.chunk_at(cat["big"].data_offset))
    loc = store.locate_chunk(victim)
    assert loc is not None
    pack = tmp_path / "store" / pack_key(loc.pack)
    raw = bytearray(pack.read_bytes())
    raw[loc.offset + loc.length - 1] ^= 0x01
    pack.write_bytes(bytes(raw))
    fresh = host.provider()
    with pytest.raises(CorruptChunkError) as failed:
        fresh.restore_directory_init(volname, "store1")
    assert victim.hex() in str(failed.value)
    assert not list(Path(tempfile.gettempdir()).glob("pvebackup-ctdir-*/root/big"))


def test_format1_archive_still_restores(host: FakeHost, tmp_path: Path) -> None:
    """An archive of format 1 (fixed-size chunks, no catalog) restores as before."""
    root = _tree(tmp_path / "ct")
    p = host.provider()
    store = p.store(create=True)
    tar = tmp_path / "old.tar"
    with open(tar, "wb") as out:
        write_pax_stream(out, str(root), ["."], ID_MAP, [], None, lambda lv, m: None)
    data = tar.read_bytes()
    from pvebackup.store.snapshot import SnapshotId

    sid = SnapshotId(GuestType.LXC, 101, int(time.time()) - 100)
    with store.new_snapshot(sid) as writer:
        cs = writer.chunk_size
        with writer.index_writer(ARCHIVE_DEVICE, len(data)) as index:
            for i in range(len(index)):
                index.set(i, store.insert_chunk(data[i * cs : (i + 1) * cs]).digest)
        writer.add_file("guest.conf", b"arch: amd64\n")
    assert _stream(host.provider(), sid.volname) == data


def test_hostile_catalog_records_are_refused() -> None:
    good = CATALOG_MAGIC
    with pytest.raises(CorruptIndexError, match="magic"):
        list(parse_catalog(b"x" * 8, 100, name="c"))
    with pytest.raises(CorruptIndexError, match="truncated"):
        list(parse_catalog(good + b"\x30" * 20, 100, name="c"))
    from pvebackup.providers.store.catalog import CatalogEntry, encode_entry

    entry = CatalogEntry("x", "0", 0o644, 0, 0, 10, 0, 0, 1, 0, 512, 10, 0)
    assert list(parse_catalog(good + encode_entry(entry), 1024, name="c")) == [entry]
    # data beyond the archive: a reader would seek outside it
    with pytest.raises(CorruptIndexError, match="out of range"):
        list(parse_catalog(good + encode_entry(entry), 500, name="c"))
    # a path length pointing past the end
    with pytest.raises(CorruptIndexError, match="truncated"):
        list(parse_catalog(good + encode_entry(entry)[:-1], 1024, name="c"))


def test_gc_and_verify_read_dynamic_indexes(host: FakeHost, tmp_path: Path) -> None:
    """GC marks (and verify checks) the chunks of the archive and the catalog."""
    from pvebackup.store.gc import collect_garbage
    from pvebackup.store.verify import verify_store

    root = _tree(tmp_path / "ct")
    volname = _backup(host, root)
    store = host.provider().store()
    snap = store.open_snapshot(store.list_snapshots()[0])
    used = {d for dev in snap.devices for d in snap.open_index(dev).digests()}
    for _ in range(2):  # condemn, then delete: nothing of a live snapshot may go
        collect_garbage(store, margin=0)
    assert all(store.has_chunk(d) for d in used)
    report = verify_store(store)
    assert report.chunks >= len(used - {bytes(32)}) and not report.bad_chunks
    assert all(r.state == "ok" for r in report.snapshots)
    fresh = host.provider()
    stream = _stream(fresh, volname)
    assert len(stream) == snap.devices[ARCHIVE_DEVICE].size
