"""backup-store single files of container archives: ``restore_file_reader`` (the
catalog), ``pvebackup ls``/``extract`` end to end, and hostile catalogs/streams."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import time
from pathlib import Path

import pytest
from bstore_support import FakeHost

from pvebackup.api.errors import (
    CorruptChunkError,
    CorruptFilesystemError,
    UnsupportedError,
)
from pvebackup.api.types import GuestType
from pvebackup.cli.main import main
from pvebackup.host.tasklog import LogRouter
from pvebackup.host.vmfiles.session import extract_entries, list_entries
from pvebackup.providers.store.catalog import SPARSE, CatalogEntry
from pvebackup.providers.store.ctarchive import ARCHIVE_DEVICE
from pvebackup.providers.store.ctfiles import CatalogFiles
from pvebackup.store.dynindex import DynamicIndex, DynamicIndexWriter
from pvebackup.store.pack import pack_key

pytestmark = pytest.mark.e2e

MiB = 1 << 20
ID_MAP = [["u", "0", "100000", "65536"], ["g", "0", "100000", "65536"]]


def _tree(root: Path) -> Path:
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "hostname").write_text("ct101\n")
    for n in range(4):
        (root / f"big{n}").write_bytes(os.urandom(2 * MiB))
    with open(root / "sparse", "wb") as f:
        f.write(b"head" * 1000)
        f.seek(4 * MiB)
        f.write(b"tail" * 1000)
        f.truncate(6 * MiB)
    os.link(root / "big1", root / "big1-link")
    os.symlink("/etc/shadow", root / "escape")
    os.chown(root / "etc" / "hostname", 100033, 100044)
    os.utime(root / "big2", ns=(1_600_000_000_123_456_789, 1_600_000_000_123_456_789))
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
    time.sleep(1.01)
    return volname


def _count_gets(store: object, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    backend = store.backend  # type: ignore[attr-defined]
    keys: list[str] = []
    real = backend.get_range

    def get_range(key: str, offset: int, length: int) -> bytes:
        keys.append(key)
        return real(key, offset, length)

    monkeypatch.setattr(backend, "get_range", get_range)
    return keys


@pytest.fixture
def backed(host: FakeHost, tmp_path: Path) -> tuple[str, Path]:
    root = _tree(tmp_path / "ct")
    return _backup(host, root), root


def test_ls_reads_only_the_catalog_and_extract_only_the_files_chunks(
    host: FakeHost, backed: tuple[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    volname, root = backed
    p = host.provider()
    store = p.store()
    snap = store.open_snapshot(store.list_snapshots()[0])
    catalog_chunks = len(snap.open_index("root.catalog"))
    gets = _count_gets(store, monkeypatch)
    reader = p.restore_file_reader(volname, "store1")
    assert len(gets) == catalog_chunks  # the listing needs nothing else
    infos = {i.name: i for i in list_entries(reader, "/")}
    assert {b"etc", b"big0", b"big1-link", b"sparse", b"escape"} <= set(infos)
    assert infos[b"escape"].target == b"/etc/shadow"
    assert infos[b"big2"].mtime_ns == 1_600_000_000_123_456_789
    [hostname] = list_entries(reader, "etc/hostname")
    assert (hostname.uid, hostname.gid) == (33, 44)  # container ids, not host ids
    assert len(gets) == catalog_chunks

    index = snap.open_index(ARCHIVE_DEVICE)
    rec = {r.path: r for r in reader._records}["big2"]  # type: ignore[attr-defined]
    needed = index.chunk_at(rec.data_end - 1) - index.chunk_at(rec.data_offset) + 1
    assert needed < len(index) - 4  # the archive has far more chunks than this file
    gets.clear()
    target = tmp_path / "out"
    extract_entries(reader, ["/big2"], target, keep_owner=True, log=LogRouter(None),
                    where=volname)  # fmt: skip
    assert len(gets) == needed
    assert (target / "big2").read_bytes() == (root / "big2").read_bytes()
    assert (target / "big2").stat().st_mtime_ns == 1_600_000_000_123_456_789


def test_extract_round_trip_of_kinds(
    host: FakeHost, backed: tuple[str, Path], tmp_path: Path
) -> None:
    volname, root = backed
    reader = host.provider().restore_file_reader(volname, "store1")
    target = tmp_path / "out"
    result = extract_entries(reader, ["/"], target, keep_owner=True, log=LogRouter(None),
                             where=volname)  # fmt: skip
    assert (target / "etc/hostname").read_text() == "ct101\n"
    st = (target / "etc/hostname").stat()
    assert (st.st_uid, st.st_gid) == (33, 44)  # numeric container ids land on disk
    assert (target / "big1-link").read_bytes() == (root / "big1").read_bytes()  # a copy
    assert (target / "sparse").read_bytes() == (root / "sparse").read_bytes()
    assert os.readlink(target / "escape") == "/etc/shadow"  # written, never followed
    assert result.files >= 6 and result.symlinks == 1


def test_extract_corrupt_chunk_fails_clearly(
    host: FakeHost, backed: tuple[str, Path], tmp_path: Path
) -> None:
    volname, _ = backed
    p = host.provider()
    store = p.store()
    snap = store.open_snapshot(store.list_snapshots()[0])
    reader = p.restore_file_reader(volname, "store1")
    rec = {r.path: r for r in reader._records}["big3"]  # type: ignore[attr-defined]
    index = snap.open_index(ARCHIVE_DEVICE)
    victim = index.digest(index.chunk_at(rec.data_offset))
    loc = store.locate_chunk(victim)
    assert loc is not None
    pack = tmp_path / "store" / pack_key(loc.pack)
    raw = bytearray(pack.read_bytes())
    raw[loc.offset + loc.length - 1] ^= 0x01
    pack.write_bytes(bytes(raw))
    fresh = host.provider().restore_file_reader(volname, "store1")
    with pytest.raises(CorruptChunkError) as failed:
        extract_entries(fresh, ["big3"], tmp_path / "out", keep_owner=False,
                        log=LogRouter(None), where=volname)  # fmt: skip
    assert victim.hex() in str(failed.value)
    assert not (tmp_path / "out" / "big3").exists()  # no partial file stays


def test_cli_ls_json_and_extract(
    host: FakeHost, backed: tuple[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    volname, root = backed
    node = tmp_path / "node"
    (node / "etc/pve").mkdir(parents=True)
    (node / "etc/pve/storage.cfg").write_text(
        f"backup-store: store1\n\tpath {host.scfg['path']}\n"
    )
    volid = f"store1:{volname}"
    assert main(["--root", str(node), "ls", volid, "etc", "--output", "json"]) == 0
    [row] = json.loads(capsys.readouterr().out)
    assert row["name"] == "hostname" and row["uid"] == 33 and row["type"] == "file"
    assert set(row) == {"name", "type", "mode", "uid", "gid", "size", "inode", "target",
                        "mtime_ns"}  # fmt: skip  docs/cli-json.md "ls"
    assert isinstance(row["mtime_ns"], int)
    out = str(tmp_path / "x")
    assert main(["--root", str(node), "extract", volid, "etc/hostname", "big0",
                 "--target", out, "--no-owner", "--output", "json"]) == 0  # fmt: skip
    done = json.loads(capsys.readouterr().out)
    assert set(done) == {"volid", "paths", "target", "files", "directories", "symlinks",
                         "bytes", "skipped"}  # fmt: skip  docs/cli-json.md "extract"
    assert done["files"] == 2 and done["bytes"] == 2 * MiB + 6
    assert (tmp_path / "x/hostname").read_text() == "ct101\n"
    assert (tmp_path / "x/hostname").stat().st_uid == os.geteuid()
    assert (tmp_path / "x/big0").read_bytes() == (root / "big0").read_bytes()
    assert main(["--root", str(node), "ls", volid, "no/such"]) == 3
    assert main(["--root", str(node), "extract", volid, "big0",
                 "--target", str(tmp_path / "x")]) == 7  # fmt: skip  not empty


def test_the_default_provider_refuses_file_access() -> None:
    from pvebackup.api.provider import BackupProvider

    with pytest.raises(UnsupportedError, match="file-level access"):
        BackupProvider(None, {}, "x", lambda level, msg: None).restore_file_reader("v", "x")


# -- hostile catalogs and streams (a fake store, a real dynamic index) -----------------


class _Store:
    def __init__(self) -> None:
        self.chunks: dict[bytes, bytes] = {}
        self.reads = 0

    def read_chunk(self, digest: bytes, size: int | None = None) -> bytes:
        self.reads += 1
        data = self.chunks[digest]
        if hashlib.sha256(data).digest() != digest:
            raise CorruptChunkError(f"chunk {digest.hex()}: damaged")
        return data


def _files(stream: bytes, records: list[CatalogEntry], piece: int = 4096) -> CatalogFiles:
    store = _Store()
    writer = DynamicIndexWriter()
    for start in range(0, len(stream), piece):
        data = stream[start : start + piece]
        digest = hashlib.sha256(data).digest()
        store.chunks[digest] = data
        writer.append(len(data), digest)
    index = DynamicIndex(writer.to_bytes())
    return CatalogFiles(store, index, records, "test")  # type: ignore[arg-type]


def _rec(path: str, kind: str, offset: int = 0, size: int = 0, *, link: str = "",
         data_size: int | None = None, flags: int = 0, mode: int = 0o644) -> CatalogEntry:
    dsize = size if data_size is None else data_size
    return CatalogEntry(path, kind, mode, 0, 0, size, 0, 0, 1, offset, offset, dsize,
                        flags, link)  # fmt: skip


def test_hostile_paths_never_leave_the_target(tmp_path: Path) -> None:
    stream = b"A" * 512 + b"B" * 512
    files = _files(stream, [
        _rec("", "5", mode=0o755),
        _rec("..", "0", 0, 10),
        _rec("a", "5"),
        _rec("a/../../up", "0", 0, 10),
        _rec("/abs", "0", 0, 10),
        _rec("link", "2", link="../.."),
        _rec("link/x", "0", 0, 10),
        _rec("ok", "0", 512, 512),
        _rec("ok", "5"),
        _rec("dev", "3"),
        _rec("suid", "0", 0, 5, mode=0o4755),
    ])  # fmt: skip
    assert files.unreachable == ["a/../../up", "/abs", "link/x"]
    outside = tmp_path / "outside"
    outside.mkdir()
    target = outside / "target"
    warnings: list[str] = []
    log = LogRouter(None)
    log.warn = warnings.append  # type: ignore[method-assign]
    result = extract_entries(files, ["/"], target, keep_owner=False, log=log, where="t")
    assert sorted(os.listdir(outside)) == ["target"]
    assert sorted(os.listdir(target)) == ["a", "link", "ok", "suid"]
    assert (target / "ok").read_bytes() == b"B" * 512
    assert os.readlink(target / "link") == "../.."
    assert stat.S_IMODE((target / "suid").stat().st_mode) == 0o755  # setuid dropped
    assert set(result.skipped) == {"/..", "/ok", "/dev"}
    with pytest.raises(Exception, match="not allowed"):
        list_entries(files, "a/../..")


def test_hostile_records_skip_the_file_not_the_rest(tmp_path: Path) -> None:
    stream = b"x" * 4096
    sparse_map = b"99999999\n"  # claims more segments than the data could hold
    stream = sparse_map + bytes(512 - len(sparse_map)) + stream[512:]
    files = _files(stream, [
        _rec("short", "0", 0, 100, data_size=50),
        _rec("dangling", "1", link="nothing"),
        _rec("forward", "1", link="./later"),
        _rec("later", "0", 0, 10),
        _rec("sparse", "0", 0, 8192, data_size=1024, flags=SPARSE),
        _rec("good", "0", 1024, 100),
    ])  # fmt: skip
    with pytest.raises(CorruptFilesystemError, match="4 entries"):
        extract_entries(files, ["/"], tmp_path / "t", keep_owner=False, log=LogRouter(None),
                        where="t")  # fmt: skip
    assert sorted(os.listdir(tmp_path / "t")) == ["good", "later"]


@pytest.mark.parametrize(
    "sparse_map",
    [b"2\n0\n10\n5\n10\n", b"1\n0\nabc\n", b"1\n9000\n10\n", b"1" * 30, b"1\n0\n"],
)
def test_hostile_sparse_maps(tmp_path: Path, sparse_map: bytes) -> None:
    stream = sparse_map + bytes(512 - len(sparse_map)) + b"d" * 512
    files = _files(stream, [_rec("s", "0", 0, 4096, data_size=len(stream), flags=SPARSE)])
    with pytest.raises(CorruptFilesystemError):
        list(files.read(files.list_dir(0)[0]))


def test_sparse_read_fills_holes(tmp_path: Path) -> None:
    sparse_map = b"2\n0\n3\n100\n2\n"
    data = b"abc" + b"de"
    stream = sparse_map + bytes(512 - len(sparse_map)) + data
    files = _files(stream, [_rec("s", "0", 0, 200, data_size=len(stream), flags=SPARSE)], 7)
    got = b"".join(files.read(files.list_dir(0)[0]))
    assert got == b"abc" + bytes(97) + b"de" + bytes(98)
