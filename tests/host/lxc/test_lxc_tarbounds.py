"""Hostile tar streams: bounded memory, typed errors, no silent truncation.

Each archive is made here, byte by byte where tarfile would not write it, and
restored in-process (privileged) so that tracemalloc sees every allocation.
"""

from __future__ import annotations

import bz2
import io
import tarfile
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import pytest
import zstandard
from lxc_fixtures import LogRecorder

from pvebackup.api.errors import IntegrityError
from pvebackup.host.lxc.restore import extract_tar
from pvebackup.host.lxc.tarstream import MAX_HEADER_BYTES

MiB = 1 << 20


def header(name: str, typeflag: bytes, size: int) -> bytes:
    """One ustar header block; ``size`` may claim anything."""
    info = tarfile.TarInfo(name)
    info.type = typeflag
    info.size = size
    block = bytearray(info.tobuf(format=tarfile.USTAR_FORMAT))
    return bytes(block)


def pax_record(key: str, value: str) -> bytes:
    body = f" {key}={value}\n"
    n = len(body) + 1
    while len(str(n)) + len(body) != n:
        n = len(str(n)) + len(body)
    return f"{n}{body}".encode()


def pad(data: bytes) -> bytes:
    return data + bytes(-len(data) % 512)


def peak_while(fn: Callable[[], None]) -> int:
    tracemalloc.start()
    try:
        fn()
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    return peak


def restore(tmp_path: Path, raw: bytes, log: LogRecorder, suffix: str = ".tar") -> Path:
    archive = tmp_path / f"a{suffix}"
    archive.write_bytes(raw)
    target = tmp_path / "target"
    target.mkdir(exist_ok=True)
    extract_tar(archive, {"/": target}, [], log=log)
    return target


def test_huge_pax_header_is_refused_before_reading_it(tmp_path: Path, log: LogRecorder) -> None:
    # A PAX header of 64 MiB of "a" (zstd makes it a few KiB): tarfile would
    # read all of it into memory, whatever size it claims.
    size = 64 * MiB
    out = io.BytesIO()
    with zstandard.ZstdCompressor().stream_writer(out, closefd=False) as w:
        w.write(header("././@PaxHeader", tarfile.XHDTYPE, size))
        chunk = b"a" * MiB
        for _ in range(size // MiB):
            w.write(chunk)
    archive = tmp_path / "a.tar.zst"
    archive.write_bytes(out.getvalue())
    target = tmp_path / "t"
    target.mkdir()

    def run() -> None:
        with pytest.raises(IntegrityError, match="extended header"):
            extract_tar(archive, {"/": target}, [], log=log)

    assert peak_while(run) < 8 * MiB
    assert size > MAX_HEADER_BYTES


def test_chained_headers_are_bounded(tmp_path: Path, log: LogRecorder) -> None:
    # 5000 PAX headers in a row: tarfile recurses once per header.
    one = pad(header("././@PaxHeader", tarfile.XHDTYPE, 512)) + pad(pax_record("comment", "x"))
    raw = one * 5000 + pad(header("f", tarfile.REGTYPE, 0)) + bytes(1024)
    with pytest.raises(IntegrityError, match="chained headers"):
        restore(tmp_path, raw, log)


def test_global_headers_do_not_accumulate(tmp_path: Path, log: LogRecorder) -> None:
    raw = b""
    for i in range(40):
        record = pad(pax_record(f"k{i}", "v" * (64 * 1024)))
        raw += pad(header("././@PaxHeader", tarfile.XGLTYPE, len(record))) + record
        raw += pad(header(f"f{i}", tarfile.REGTYPE, 0))  # each applies to all that follow
    raw += bytes(1024)
    with pytest.raises(IntegrityError, match="global headers"):
        restore(tmp_path, raw, log)


def test_damaged_header_mid_archive_is_an_error(tmp_path: Path, log: LogRecorder) -> None:
    good = io.BytesIO()
    with tarfile.open(fileobj=good, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name in ("a", "b", "c"):
            info = tarfile.TarInfo(name)
            info.size = 3
            tf.addfile(info, io.BytesIO(b"abc"))
    raw = bytearray(good.getvalue())
    second = raw.index(b"b\x00") - 0  # the header of member "b"
    raw[second + 148 : second + 156] = b"garbage!"  # its checksum
    # tarfile on its own stops at "b" and reports success with one file.
    with pytest.raises(IntegrityError):
        restore(tmp_path, bytes(raw), log)


def test_sparse_map_claiming_millions_of_segments(tmp_path: Path, log: LogRecorder) -> None:
    pax = pad(
        pax_record("GNU.sparse.major", "1")
        + pax_record("GNU.sparse.minor", "0")
        + pax_record("GNU.sparse.name", "big")
        + pax_record("GNU.sparse.realsize", str(1 << 40))
    )
    data = pad(b"99999999999\n" + b"0\n" * 200)
    raw = (
        pad(header("././@PaxHeader", tarfile.XHDTYPE, len(pax))) + pax
        + pad(header("big", tarfile.REGTYPE, len(data))) + data + bytes(1024)
    )
    with pytest.raises(IntegrityError, match="sparse map"):
        restore(tmp_path, raw, log)


def test_sparse_map_going_backwards(tmp_path: Path, log: LogRecorder) -> None:
    pax = pad(
        pax_record("GNU.sparse.major", "1")
        + pax_record("GNU.sparse.minor", "0")
        + pax_record("GNU.sparse.name", "f")
        + pax_record("GNU.sparse.realsize", "8192")
    )
    data = pad(b"2\n4096\n512\n0\n512\n") + bytes(1024)
    raw = (
        pad(header("././@PaxHeader", tarfile.XHDTYPE, len(pax))) + pax
        + pad(header("f", tarfile.REGTYPE, len(data))) + data + bytes(1024)
    )
    with pytest.raises(IntegrityError, match="sparse map"):
        restore(tmp_path, raw, log)


def test_bzip2_bomb_is_inflated_a_little_at_a_time(tmp_path: Path, log: LogRecorder) -> None:
    # 48 MiB of zeros are ~80 bytes of bzip2; tarfile's own "r|*" inflates a
    # whole input block at once.
    size = 48 * MiB
    plain = io.BytesIO()
    with tarfile.open(fileobj=plain, mode="w") as tf:
        info = tarfile.TarInfo("zeros")
        info.size = size
        tf.addfile(info, io.BytesIO(bytes(size)))
    packed = bz2.compress(plain.getvalue(), 9)
    del plain
    archive = tmp_path / "a.tar.bz2"
    archive.write_bytes(packed)
    target = tmp_path / "t"
    target.mkdir()
    peak = peak_while(lambda: extract_tar(archive, {"/": target}, [], log=log))
    assert (target / "zeros").stat().st_size == size
    assert (target / "zeros").stat().st_blocks == 0  # all holes
    assert peak < 8 * MiB


def test_out_of_range_values_are_typed_errors(tmp_path: Path, log: LogRecorder) -> None:
    pax = pad(pax_record("uid", str(1 << 40)))
    raw = (
        pad(header("././@PaxHeader", tarfile.XHDTYPE, len(pax))) + pax
        + pad(header("f", tarfile.REGTYPE, 0)) + bytes(1024)
    )
    with pytest.raises(IntegrityError, match="owner"):
        restore(tmp_path, raw, log)


def test_plain_tar_whose_first_name_looks_like_a_magic(tmp_path: Path, log: LogRecorder) -> None:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tf:
        for name in ("BZh9-notes", "\x1f\x8bx"):
            info = tarfile.TarInfo(name)
            info.size = 2
            tf.addfile(info, io.BytesIO(b"ok"))
    target = restore(tmp_path, raw.getvalue(), log)
    assert (target / "BZh9-notes").read_bytes() == b"ok"
