"""Property-based fuzzing of the container archive readers (tar and directory).

The property, for any archive hypothesis can make (hostile names, links, types,
ids, times, xattrs, then bytes flipped or cut): the restore succeeds or raises a
:class:`PveBackupError`, never another exception; nothing outside the target
changes; memory stays bounded. Most examples run the writer in this process
(privileged, so that tracemalloc sees the allocations); a few go through the
real helper in a user namespace.
"""

from __future__ import annotations

import io
import os
import stat
import tarfile
import tempfile
import tracemalloc
from collections.abc import Callable
from pathlib import Path

from hypothesis import HealthCheck, given, reject, settings
from hypothesis import strategies as st
from lxc_fixtures import LogRecorder

from pvebackup.api.errors import PveBackupError
from pvebackup.api.idmap import DEFAULT_UNPRIVILEGED_MAP
from pvebackup.host.lxc.restore import copy_directory, extract_tar

MiB = 1 << 20
FAST = settings(
    max_examples=60,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
THROUGH_HELPER = settings(FAST, max_examples=6)

# -- a sandbox: the target, and things beside it that must not change -------------


class Sandbox:
    def __init__(self, base: Path) -> None:
        self.root = Path(tempfile.mkdtemp(dir=base))
        self.target = self.root / "target"
        self.target.mkdir()
        self.outside = self.root / "outside"
        self.outside.mkdir()
        (self.outside / "precious").write_text("keep")
        self.before = self.snapshot()

    def snapshot(self) -> dict[str, tuple[int, int, bytes]]:
        """Everything under the sandbox except the target: type, mode, contents."""
        out = {}
        for dirpath, dirnames, filenames in os.walk(self.root):
            if Path(dirpath) == self.root:
                dirnames.remove("target")
            for name in dirnames + filenames:
                p = Path(dirpath, name)
                s = p.lstat()
                data = p.read_bytes() if stat.S_ISREG(s.st_mode) else b""
                out[str(p)] = (stat.S_IFMT(s.st_mode), s.st_mode, data)
        return out

    def check(self, run: Callable[[], None], *, measure: bool) -> None:
        if measure:
            tracemalloc.start()
        try:
            run()
        except PveBackupError:
            pass  # a typed refusal is a fine outcome; anything else fails the test
        finally:
            if measure:
                _, peak = tracemalloc.get_traced_memory()
                tracemalloc.stop()
                assert peak < 64 * MiB
        assert self.snapshot() == self.before
        assert sorted(os.listdir(self.root)) == ["outside", "target"]


# -- tar archives -----------------------------------------------------------------

COMPONENTS = st.sampled_from(
    ["a", "b", "etc", "dev", ".", "..", "", "x" * 300, "\udcff\udcfe", "sp ace", "ü", "srv"]
)
NAMES = st.builds(
    lambda lead, parts: lead + "/".join(parts),
    st.sampled_from(["", "", "./", "/", "../"]),
    st.lists(COMPONENTS, min_size=1, max_size=4),
)
TYPES = st.sampled_from(
    [
        tarfile.REGTYPE, tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE,
        tarfile.CHRTYPE, tarfile.BLKTYPE, tarfile.FIFOTYPE, tarfile.CONTTYPE, b"Z", b"V",
    ]
)
XATTRS = st.dictionaries(
    st.sampled_from(
        [
            "user.a", "user.b", "security.capability", "system.posix_acl_access",
            "system.posix_acl_default", "trusted.x", "security.selinux", "bogus",
        ]
    ),
    st.binary(max_size=48),
    max_size=3,
)
TIMES = st.sampled_from(["0", "1.5", "-1", "1e30", "nan", "inf", "abc", "99999999999999999999"])


@st.composite
def members(draw: st.DrawFn, outside: str) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(draw(NAMES))
    info.type = draw(TYPES)
    info.mode = draw(st.integers(0, 0o7777))
    info.uid = draw(st.sampled_from([0, 33, 1000, 65534, 70000, 2**32 - 1, 2**40]))
    info.gid = draw(st.sampled_from([0, 5, 65534, 2**31]))
    info.linkname = draw(st.one_of(NAMES, st.just(outside), st.just(outside + "/precious")))
    # Only harmless device numbers: a privileged restore makes what it is told.
    info.devmajor, info.devminor = draw(st.sampled_from([(1, 3), (1, 5), (0, 0)]))
    pax = {
        f"SCHILY.xattr.{k}": v.decode("utf-8", "surrogateescape")
        for k, v in draw(XATTRS).items()
    }
    if draw(st.booleans()):
        pax["mtime"] = draw(TIMES)
    if draw(st.booleans()):
        pax["SCHILY.acl.access"] = draw(st.sampled_from(["user::rwx,user:7:r--", "garbage"]))
    info.pax_headers = pax
    data = draw(st.binary(max_size=64)) if info.type in (tarfile.REGTYPE, b"Z") else b""
    info.size = len(data)
    return info, data


def build_tar(entries: list[tuple[tarfile.TarInfo, bytes]]) -> bytes:
    out = io.BytesIO()
    try:
        with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT,
                          encoding="utf-8", errors="surrogateescape") as tf:
            for info, data in entries:
                tf.addfile(info, io.BytesIO(data) if info.size else None)
    except (ValueError, UnicodeError, tarfile.TarError):
        reject()  # tarfile will not write this one; the mutations below cover such bytes
    return out.getvalue()


PAX_KEYS = st.sampled_from(
    [
        "path", "linkpath", "size", "uid", "gid", "mtime", "hdrcharset", "comment",
        "GNU.sparse.major", "GNU.sparse.minor", "GNU.sparse.name", "GNU.sparse.realsize",
        "GNU.sparse.size", "GNU.sparse.map", "GNU.sparse.offset", "GNU.sparse.numbytes",
        "SCHILY.xattr.user.a", "SCHILY.xattr.security.capability", "SCHILY.acl.access",
    ]
)
PAX_VALUES = st.one_of(
    st.sampled_from(["0", "1", "-1", "1,2,3", "0,512,1024,512", "BINARY", "1e99", "", "../x"]),
    st.text(max_size=12),
)
SIZES = st.sampled_from([0, 1, 511, 512, 4096, 10**6, 8**11 - 1])


def pax_body(records: list[tuple[str, str]]) -> bytes:
    out = b""
    for key, value in records:
        body = f" {key}={value}\n".encode("utf-8", "surrogateescape")
        n = len(body) + 1
        while len(str(n)) + len(body) != n:
            n = len(str(n)) + len(body)
        out += str(n).encode() + body
    return out


def raw_header(name: bytes, typeflag: bytes, size: int, link: bytes, isextended: bool) -> bytes:
    """A ustar header with a valid checksum, whatever its fields say."""
    block = bytearray(512)
    block[0:100] = name[:100].ljust(100, b"\0")
    block[100:108] = b"0000644\0"
    block[108:116] = b"0000000\0"
    block[116:124] = b"0000000\0"
    block[124:136] = b"%011o\0" % size
    block[136:148] = b"%011o\0" % 1_600_000_000
    block[156:157] = typeflag
    block[157:257] = link[:100].ljust(100, b"\0")
    block[257:265] = b"ustar\x0000"
    if typeflag == b"S":
        block[386:398] = b"%011o\0" % 0
        block[398:410] = b"%011o\0" % size
        block[482] = int(isextended)
        block[483:495] = b"%011o\0" % (size * 4)
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)
    return bytes(block)


@st.composite
def crafted(draw: st.DrawFn) -> bytes:
    """Header blocks tarfile would never write: any type, any size, any PAX record."""
    raw = b""
    for _ in range(draw(st.integers(1, 6))):
        typeflag = draw(st.sampled_from([b"x", b"g", b"L", b"K", b"S", b"0", b"5", b"2", b"1"]))
        body = b""
        if typeflag in (b"x", b"g"):
            body = pax_body(draw(st.lists(st.tuples(PAX_KEYS, PAX_VALUES), max_size=5)))
        elif typeflag in (b"L", b"K", b"0"):
            body = draw(st.binary(max_size=64))
        size = draw(st.one_of(st.just(len(body)), SIZES))
        name = draw(st.sampled_from([b"a", b"../a", b"/etc/x", b"d/", b"\xff"]))
        link = draw(st.sampled_from([b"", b"a", b"/etc", b"../../x"]))
        raw += raw_header(name, typeflag, size, link, draw(st.booleans()))
        raw += body + bytes(-len(body) % 512)
        if typeflag == b"S" and draw(st.booleans()):
            raw += draw(st.binary(min_size=512, max_size=512))
    return raw + bytes(1024 * draw(st.integers(0, 1)))


@st.composite
def archives(draw: st.DrawFn, outside: str) -> bytes:
    if draw(st.booleans()):
        raw = bytearray(draw(crafted()))
    else:
        raw = bytearray(build_tar(draw(st.lists(members(outside), max_size=8))))
    for _ in range(draw(st.integers(0, 4))):
        if raw:
            raw[draw(st.integers(0, len(raw) - 1))] = draw(st.integers(0, 255))
    if draw(st.booleans()) and raw:
        del raw[draw(st.integers(0, len(raw))) :]
    return bytes(raw)


def _fuzz_tar(tmp_path: Path, data: st.DataObject, id_map: list, measure: bool) -> None:
    box = Sandbox(tmp_path)
    raw = data.draw(archives(str(box.outside)))
    archive = box.root / "outside" / "archive.tar"  # sits beside the precious file
    archive.write_bytes(raw)
    box.before = box.snapshot()
    box.check(
        lambda: extract_tar(archive, {"/": box.target}, id_map, log=LogRecorder()),
        measure=measure,
    )


@FAST
@given(data=st.data())
def test_fuzz_tar_archive(tmp_path: Path, data: st.DataObject) -> None:
    _fuzz_tar(tmp_path, data, [], measure=True)


@THROUGH_HELPER
@given(data=st.data())
def test_fuzz_tar_archive_through_helper(tmp_path: Path, data: st.DataObject) -> None:
    _fuzz_tar(tmp_path, data, list(DEFAULT_UNPRIVILEGED_MAP), measure=False)


# -- directory archives -----------------------------------------------------------

DIR_NAMES = st.one_of(
    st.sampled_from([b"a", b"b", b"etc", b"dev", b"x" * 255, b"\xff\xfe", b"sp ace", b"-"]),
    st.binary(min_size=1, max_size=12).filter(
        lambda b: b"/" not in b and b"\0" not in b and b not in (b".", b"..")
    ),
)


@st.composite
def tree_ops(draw: st.DrawFn) -> list[tuple[str, list[bytes], bytes]]:
    ops = []
    for _ in range(draw(st.integers(1, 10))):
        kind = draw(st.sampled_from(["file", "dir", "symlink", "hardlink", "fifo", "xattr"]))
        where = draw(st.lists(DIR_NAMES, min_size=1, max_size=3))
        extra = draw(
            st.one_of(
                st.binary(max_size=32),
                st.sampled_from([b"../../outside", b"../../../outside/precious", b"/", b"."]),
            )
        )
        ops.append((kind, where, extra))
    return ops


def _parent_fd(src: Path, where: list[bytes], *, create: bool) -> int:
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
    fd = os.open(src, flags)
    try:
        for comp in where[:-1]:
            if create:
                try:
                    os.mkdir(comp, dir_fd=fd)
                except FileExistsError:
                    pass
            nfd = os.open(comp, flags, dir_fd=fd)
            os.close(fd)
            fd = nfd
    except BaseException:
        os.close(fd)
        raise
    return fd


def build_tree(src: Path, ops: list[tuple[str, list[bytes], bytes]], outside: Path) -> None:
    """Carry out what can be done of ``ops``; an op with something in its way is skipped.

    Built fd-relative without following symlinks: the tree holds symlinks to
    anywhere, and building it must not write through them.
    """
    made: list[list[bytes]] = []
    for kind, where, extra in ops:
        try:
            fd = _parent_fd(src, where, create=True)
        except OSError:
            continue
        try:
            name = where[-1]
            if kind == "file":
                f = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW,
                            0o644, dir_fd=fd)
                os.write(f, extra)
                os.close(f)
                made.append(where)
            elif kind == "dir":
                os.mkdir(name, dir_fd=fd)
            elif kind == "symlink":
                target = extra.replace(b"\0", b"") or b"x"
                os.symlink(bytes(outside) if extra == b"/" else target, name, dir_fd=fd)
            elif kind == "hardlink" and made:
                first = made[len(extra) % len(made)]
                src_fd = _parent_fd(src, first, create=False)
                try:
                    os.link(first[-1], name, src_dir_fd=src_fd, dst_dir_fd=fd,
                            follow_symlinks=False)
                finally:
                    os.close(src_fd)
            elif kind == "fifo":
                os.mkfifo(name, dir_fd=fd)
            elif kind == "xattr":
                os.setxattr(fd, "user.fuzz", extra)
        except OSError:
            pass
        finally:
            os.close(fd)


def _fuzz_dir(tmp_path: Path, data: st.DataObject, id_map: list, measure: bool) -> None:
    box = Sandbox(tmp_path)
    src = box.root / "outside" / "src"
    src.mkdir()
    build_tree(src, data.draw(tree_ops()), box.outside)
    box.before = box.snapshot()
    box.check(
        lambda: copy_directory(src, {"/": box.target}, id_map, log=LogRecorder()),
        measure=measure,
    )


@FAST
@given(data=st.data())
def test_fuzz_directory_archive(tmp_path: Path, data: st.DataObject) -> None:
    _fuzz_dir(tmp_path, data, [], measure=True)


@THROUGH_HELPER
@given(data=st.data())
def test_fuzz_directory_archive_through_helper(tmp_path: Path, data: st.DataObject) -> None:
    _fuzz_dir(tmp_path, data, list(DEFAULT_UNPRIVILEGED_MAP), measure=False)
