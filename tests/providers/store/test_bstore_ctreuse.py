"""backup-store metadata-mode reuse: unchanged members are not read again, and
every kind of change is still seen."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from bstore_support import FakeHost

from pvebackup.api.errors import CorruptChunkError, CorruptIndexError
from pvebackup.api.types import GuestType
from pvebackup.kit.fswalk import SourceWalker
from pvebackup.kit.fsxattrs import ContainerIds
from pvebackup.kit.paxtar import hardlink_target
from pvebackup.providers.store.catalog import CatalogEntry
from pvebackup.providers.store.ctarchive import ARCHIVE_DEVICE, _run_start, read_catalog
from pvebackup.providers.store.ctreuse import PreviousArchive
from pvebackup.store.datastore import Datastore
from pvebackup.store.dynindex import DynamicIndex

pytestmark = pytest.mark.e2e

KiB, MiB = 1 << 10, 1 << 20
ID_MAP = [["u", "0", "100000", "65536"], ["g", "0", "100000", "65536"]]


def _tree(root: Path) -> Path:
    for d in ("etc", "srv/data", "srv/empty", "var/log"):
        (root / d).mkdir(parents=True)
    for i in range(30):
        (root / "etc" / f"small{i:02d}").write_bytes(os.urandom(100 + 97 * i))
    (root / "srv/data/big1").write_bytes(os.urandom(2 * MiB))
    (root / "srv/data/big2").write_bytes(os.urandom(300 * KiB))
    (root / "srv/data/mid").write_bytes(os.urandom(70 * KiB))
    os.link(root / "srv/data/big1", root / "srv/hard")
    os.symlink("../etc/small01", root / "srv/sym")
    (root / "var/log/syslog").write_text("boot\n" * 1000)
    return root


def _backup(host: FakeHost, root: Path) -> str:
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


def _stream(host: FakeHost, volname: str) -> bytes:
    p = host.provider()
    path = p.restore_tar_init(volname, "store1")
    with open(path, "rb") as f:
        data = f.read()
    p.restore_tar_cleanup(volname, "store1")
    return data


def _reuse_line(host: FakeHost) -> str:
    return [m for m in host.log.text().splitlines() if "without reading" in m][-1]


def _restore_and_compare(host: FakeHost, volname: str, source: Path, tmp: Path) -> None:
    (tmp / "r.tar").write_bytes(_stream(host, volname))
    out = tmp / "restored"
    subprocess.run(["rm", "-rf", str(out)], check=True)
    out.mkdir()
    subprocess.run(["tar", "-xf", str(tmp / "r.tar"), "-C", str(out)], check=True)
    diff = subprocess.run(["diff", "-r", "--no-dereference", str(source), str(out)],
                          capture_output=True, text=True)  # fmt: skip
    assert diff.returncode == 0, diff.stdout + diff.stderr


def test_unchanged_rerun_reuses_everything_byte_for_byte(host: FakeHost, tmp_path: Path) -> None:
    root = _tree(tmp_path / "ct")
    first = _backup(host, root)
    second = _backup(host, root)
    line = _reuse_line(host)
    entries = sum(1 for _ in root.rglob("*")) + 1  # and the root
    assert f"reused {entries} unchanged entries" in line, line
    assert "3 large files" in line, line  # big1, big2, mid (big1's link has no data)
    # Same metadata, same content: the reused archive is the same stream.
    assert _stream(host, second) == _stream(host, first)


def test_every_change_is_seen(host: FakeHost, tmp_path: Path) -> None:
    root = _tree(tmp_path / "ct")
    _backup(host, root)
    big1 = root / "srv/data/big1"
    st = big1.stat()
    # Same size, mtime put back: only the ctime (and content) says it changed.
    with open(big1, "r+b") as f:
        f.seek(MiB)
        f.write(b"changed!")
    os.utime(big1, ns=(st.st_atime_ns, st.st_mtime_ns))
    small = root / "etc/small05"
    st = small.stat()
    small.write_bytes(b"new size")  # size changed, mtime preserved
    os.utime(small, ns=(st.st_atime_ns, st.st_mtime_ns))
    (root / "srv/data/big2").unlink()
    os.symlink("mid", root / "srv/data/big2")  # a file replaced by a symlink
    (root / "etc/small07").unlink()
    (root / "etc/zz-new").write_text("added\n")
    volname = _backup(host, root)
    line = _reuse_line(host)
    assert "1 large files" in line, line  # only "mid" is unchanged and large
    _restore_and_compare(host, volname, root, tmp_path)


def test_missing_chunk_means_reading(host: FakeHost, tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    root = _tree(tmp_path / "ct")
    _backup(host, root)
    # As if garbage collection had condemned every chunk before this session.
    monkeypatch.setattr(Datastore, "has_chunk", lambda self, digest: False)
    volname = _backup(host, root)
    assert "reused 0 unchanged entries and 0 large files" in _reuse_line(host)
    _restore_and_compare(host, volname, root, tmp_path)


def test_hostile_catalog_offsets_are_not_trusted(host: FakeHost, tmp_path: Path) -> None:
    root = _tree(tmp_path / "ct")
    _backup(host, root)
    store = host.provider().store()
    snap = store.open_snapshot(store.list_snapshots()[-1])
    index = snap.open_index(ARCHIVE_DEVICE)
    assert isinstance(index, DynamicIndex)
    entries = read_catalog(store, snap)
    good = PreviousArchive("v", index, entries)
    ids = ContainerIds(ID_MAP)
    inodes: dict[tuple[int, int], str] = {}
    walked = [(e, hardlink_target(inodes, e)) for e in SourceWalker(str(root), ["."], [])]
    big = next(i for i, (e, _) in enumerate(walked) if e.relpath == "srv/data/big1")
    run = walked[big - 1 : big + 1]  # srv/data (a run start) and big1's headers
    assert good.group(store, run, ids, data_follows=True) is not None
    # The same catalog with big1's data moved off its chunk boundary by 512 bytes.
    from dataclasses import replace

    forged = [replace(e, data_offset=e.data_offset + 512) if e.path == "srv/data/big1" else e
              for e in entries]  # fmt: skip
    bad = PreviousArchive("v", index, forged)
    assert bad.group(store, run, ids, data_follows=True) is None
    assert bad.file_data(store, next(e for e in forged if e.path == "srv/data/big1")) is None


def test_previous_catalog_is_streamed_in_walk_order(host: FakeHost, tmp_path: Path) -> None:
    """The cursor reads only as far as the walk: records are not loaded whole."""
    root = _tree(tmp_path / "ct")
    _backup(host, root)
    store = host.provider().store()
    snap = store.open_snapshot(store.list_snapshots()[-1])
    index = snap.open_index(ARCHIVE_DEVICE)
    assert isinstance(index, DynamicIndex)
    entries = read_catalog(store, snap)
    taken: list[str] = []

    def counted() -> Iterator[CatalogEntry]:
        for e in entries:
            taken.append(e.path)
            yield e

    prev = PreviousArchive("v", index, counted())
    ids = ContainerIds(ID_MAP)
    inodes: dict[tuple[int, int], str] = {}
    walked = [(e, hardlink_target(inodes, e)) for e in SourceWalker(str(root), ["."], [])]
    assert [e.relpath for e, _ in walked] == [e.path for e in entries]  # same order
    def starts(i: int) -> bool:
        return walked[i][0].is_dir or _run_start(walked[i][0].relpath)

    # A one-member run: it and the next member each start a run (in the middle of
    # the walk, so there is something left to not read).
    small = next(i for i in range(len(walked) // 2, len(walked) - 2)
                 if starts(i) and starts(i + 1) and walked[i][0].st.st_size < 16 * KiB)
    assert prev.group(store, walked[small : small + 1], ids, data_follows=False) is not None
    assert len(taken) == small + 2  # up to the record after the run, nothing more
    # A path the walk has passed is not found again (the cursor only moves forward).
    assert prev.group(store, walked[1:2], ids, data_follows=False) is None


def test_previous_catalog_damaged_midway_ends_reuse_with_a_warning(
    host: FakeHost, tmp_path: Path
) -> None:
    root = _tree(tmp_path / "ct")
    _backup(host, root)
    store = host.provider().store()
    snap = store.open_snapshot(store.list_snapshots()[-1])
    index = snap.open_index(ARCHIVE_DEVICE)
    assert isinstance(index, DynamicIndex)
    entries = read_catalog(store, snap)

    def damaged() -> Iterator[CatalogEntry]:
        yield from entries[:5]
        raise CorruptChunkError("chunk abcd: damaged")

    warnings: list[str] = []
    prev = PreviousArchive("v", index, damaged(), lambda level, msg: warnings.append(msg))
    ids = ContainerIds(ID_MAP)
    inodes: dict[tuple[int, int], str] = {}
    walked = [(e, hardlink_target(inodes, e)) for e in SourceWalker(str(root), ["."], [])]
    assert prev.group(store, walked[10:11], ids, data_follows=False) is None
    assert len(warnings) == 1 and "chunk abcd: damaged" in warnings[0]
    assert prev.group(store, walked[12:13], ids, data_follows=False) is None  # no raise


def test_iter_catalog_over_pieces_equals_the_whole() -> None:
    from pvebackup.providers.store.catalog import (
        CATALOG_MAGIC,
        encode_entry,
        iter_catalog,
        parse_catalog,
    )

    records = [CatalogEntry(f"dir/name-{i}", "0", 0o644, 1, 2, i, 5, 6, 7, 1000 * i + 1,
                            1000 * i + 512, i, 0) for i in range(50)]  # fmt: skip
    data = CATALOG_MAGIC + b"".join(encode_entry(r) for r in records)
    pieces = [data[i : i + 7] for i in range(0, len(data), 7)]
    assert list(iter_catalog(pieces, 10**6, name="c")) == records
    assert list(parse_catalog(data, 10**6, name="c")) == records
    with pytest.raises(CorruptIndexError, match="truncated"):
        list(iter_catalog(pieces[:-1], 10**6, name="c"))


def test_known_chunks_do_not_pile_up_until_finish() -> None:
    """An unchanged re-run appends only known chunks: they are indexed as they come."""
    from pvebackup.providers.store import cdc
    from pvebackup.store.dynindex import DynamicIndexWriter

    index = DynamicIndexWriter()
    sink = cdc.CdcSink(None, index)  # type: ignore[arg-type]  # no chunk is stored
    try:
        for i in range(1000):
            sink.append_known(512, i.to_bytes(32, "big"))
            assert len(sink._pending) <= cdc._QUEUED
    finally:
        sink.finish()
    assert len(index) == 1000 and sink.stats.reused == 512 * 1000
