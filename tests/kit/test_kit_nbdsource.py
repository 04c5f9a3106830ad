"""kit.nbdsource: extents, ordered reads, buffer reuse, joined discards.

Unit tests run against the documented fake (kit.nbdfake); the e2e tests against a
real ``qemu-nbd`` export of a small qcow2, started and stopped by PID.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pvebackup.api.errors import NbdError
from pvebackup.kit.nbdfake import FakeNbdSource
from pvebackup.kit.nbdsource import (
    ALLOCATION_CONTEXT,
    STATE_HOLE,
    STATE_ZERO,
    TRIM_BATCH,
    BufferPool,
    NbdSource,
    Range,
    Trimmer,
    dirty_bitmap_context,
    is_data,
    is_dirty,
    merge_ranges,
    read_in_order,
)

KIB = 1024
MIB = 1024 * KIB


@dataclass(frozen=True)
class Job:
    offset: int
    length: int
    reads: tuple[Range, ...]


def whole(offset: int, length: int) -> Job:
    return Job(offset, length, ((offset, length),))


def pattern(size: int) -> bytes:
    return bytes((i * 7 + i // 4096) % 251 + 1 for i in range(size))


# -- unit tests with the fake ---------------------------------------------------------


def test_contexts_and_ranges() -> None:
    assert ALLOCATION_CONTEXT == "base:allocation"
    assert dirty_bitmap_context("bm1") == "qemu:dirty-bitmap:bm1"
    assert merge_ranges([(10, 5), (0, 10), (30, 0), (14, 2), (40, 1)]) == [(0, 16), (40, 1)]


def test_flags_say_what_to_read() -> None:
    assert is_data(0)
    assert not is_data(STATE_HOLE | STATE_ZERO)  # hole
    assert not is_data(STATE_ZERO)  # allocated zeroes
    assert is_data(STATE_HOLE)  # a hole that is not known zero (backing file): read it
    assert is_dirty(1) and is_dirty(3) and not is_dirty(0) and not is_dirty(2)


def test_reads_come_back_in_order_with_bounded_depth_and_reused_buffers() -> None:
    data = pattern(64 * 4096)
    fake = FakeNbdSource(data)
    pool = BufferPool()
    jobs = [whole(i * 4096, 4096) for i in range(64)]
    seen = []
    for job, buf, view in read_in_order(fake, jobs, pool, depth=3):
        assert bytes(view) == data[job.offset : job.offset + job.length]
        seen.append(job.offset)
        pool.give(buf)
    assert seen == [j.offset for j in jobs]
    assert fake.max_in_flight == 3
    # libnbd 1.14 keeps every buffer a read went into alive: they must be few.
    assert len(fake.buffers) <= 4


def test_jobs_are_pulled_lazily_and_paced_before_reading() -> None:
    fake = FakeNbdSource(bytes(10 * 4096))
    events: list[str] = []

    def jobs() -> Iterator[Job]:
        for i in range(10):
            events.append(f"job {i}")
            yield whole(i * 4096, 4096)

    def pace(n: int) -> None:
        events.append(f"pace {n} reads={len(fake.reads)}")

    reader = read_in_order(fake, jobs(), BufferPool(), depth=2, pace=pace)
    next(reader)
    # two jobs pulled for the window, each paid before its read was issued
    assert events == ["job 0", "pace 4096 reads=0", "job 1", "pace 4096 reads=1"]


def test_gaps_read_as_zeros_in_a_reused_buffer() -> None:
    # The pool hands back a buffer full of the previous job's bytes: the parts of a
    # job that are not read (holes) must come out zero, not stale data.
    data = b"\xaa" * (3 * 4096)
    fake = FakeNbdSource(data)
    pool = BufferPool()
    jobs = [
        whole(0, 4096),
        Job(4096, 4096, ((4096 + 1024, 1024), (4096 + 3072, 512))),
    ]
    out = []
    for _job, buf, view in read_in_order(fake, jobs, pool, depth=1):
        out.append(bytes(view))
        pool.give(buf)
    assert len(fake.buffers) == 1  # the second job did reuse the first one's buffer
    expected = bytearray(4096)
    expected[1024:2048] = b"\xaa" * 1024
    expected[3072:3584] = b"\xaa" * 512
    assert out[1] == bytes(expected)
    assert fake.reads == [(0, 4096), (5120, 1024), (7168, 512)]


def test_a_failed_read_raises_nbd_error() -> None:
    fake = FakeNbdSource(bytes(8 * 4096), fail_at=5 * 4096 + 1)
    pool = BufferPool()
    done = []
    with pytest.raises(NbdError, match="injected"):
        for job, buf, _ in read_in_order(fake, [whole(i * 4096, 4096) for i in range(8)], pool):
            done.append(job.offset)
            pool.give(buf)
    assert done == [0, 4096, 2 * 4096, 3 * 4096, 4 * 4096]


def test_fake_refuses_reads_outside_dirty_extents_like_qemu() -> None:
    fake = FakeNbdSource(bytes(MIB), dirty=[(64 * KIB, 64 * KIB)])
    assert fake.dirty_extents() == [(64 * KIB, 64 * KIB)]
    with pytest.raises(NbdError):
        fake.data_extents()
    buf = memoryview(bytearray(4096))
    fake.submit_read(buf, 64 * KIB)
    with pytest.raises(NbdError, match="outside the dirty extents"):
        fake.submit_read(buf, 128 * KIB - 1024)
    with pytest.raises(NbdError, match="no dirty bitmap"):
        FakeNbdSource(bytes(4096)).dirty_extents()


def test_trimmer_joins_consecutive_ranges_and_aligns() -> None:
    fake = FakeNbdSource(bytes(4 * MIB))
    trimmer = Trimmer(fake)
    # four consecutive 16 KiB pieces make one aligned 64 KiB discard; alone, none
    # of them holds a whole 64 KiB block and nothing would be discarded
    trimmer.add([(i * 16 * KIB, 16 * KIB) for i in range(4)])
    trimmer.add([(MIB + 1000, 200 * KIB)])  # a gap: flushes, unaligned edges dropped
    trimmer.flush()
    assert fake.trims == [(0, 64 * KIB), (MIB + 64 * KIB, 128 * KIB)]
    assert trimmer.discarded == 192 * KIB


def test_trimmer_batches_and_skips_read_only_exports() -> None:
    fake = FakeNbdSource(bytes(64 * MIB))
    trimmer = Trimmer(fake)
    trimmer.add([(i * MIB, MIB) for i in range(40)])
    trimmer.flush()
    assert all(n <= TRIM_BATCH + MIB for _, n in fake.trims)
    assert merge_ranges(fake.trims) == [(0, 40 * MIB)]
    read_only = FakeNbdSource(bytes(MIB), can_trim=False)
    quiet = Trimmer(read_only)
    quiet.add([(0, MIB)])
    quiet.flush()
    assert read_only.trims == [] and quiet.discarded == 0


def test_discard_at_the_end_of_an_unaligned_disk() -> None:
    size = MIB + 512
    fake = FakeNbdSource(bytes(size))
    trimmer = Trimmer(fake)
    trimmer.add([(MIB - 64 * KIB, 64 * KIB + 512)])
    trimmer.flush()
    assert fake.trims == [(MIB - 64 * KIB, 64 * KIB + 512)]


# -- e2e with qemu-nbd --------------------------------------------------------------


def run(*cmd: str) -> str:
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert result.returncode == 0, f"{' '.join(cmd)} failed: {result.stderr}"
    return result.stdout


def qemu_io(image: Path, *commands: str) -> None:
    args = ["qemu-io", "-f", "qcow2"]
    for command in commands:
        args += ["-c", command]
    run(*args, str(image))


class Exports:
    """``qemu-nbd --fork`` exports, stopped by PID."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.pids: list[int] = []

    def start(self, image: Path, *, bitmap: str | None = None, writable: bool = False) -> str:
        n = len(self.pids)
        sock, pidfile = self.tmp_path / f"nbd{n}.sock", self.tmp_path / f"nbd{n}.pid"
        args = ["qemu-nbd", "--fork", "--persistent", "--pid-file", str(pidfile)]
        args += ["-f", "qcow2", "-k", str(sock), "-x", "drive-scsi0"]
        args += ["--discard=unmap"] if writable else ["-r"]
        if bitmap is not None:
            args += ["-B", bitmap]
        run(*args, str(image))
        self.pids.append(int(pidfile.read_text()))
        return str(sock)

    def stop(self) -> None:
        for pid in self.pids:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                try:
                    with open(f"/proc/{pid}/stat") as stat:
                        if stat.read().rsplit(")", 1)[1].split()[0] == "Z":
                            break
                except FileNotFoundError:
                    break
                time.sleep(0.02)
        self.pids.clear()


@pytest.fixture
def exports(tmp_path: Path) -> Iterator[Exports]:
    ex = Exports(tmp_path)
    yield ex
    ex.stop()


def small_disk(tmp_path: Path) -> Path:
    disk = tmp_path / "disk.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", str(disk), "4M")
    qemu_io(disk, "write -P 0x11 1M 64K", "write -P 0x22 3M 128K", "write -z 2M 64K")
    return disk


def expected_bytes() -> bytes:
    data = bytearray(4 * MIB)
    data[MIB : MIB + 64 * KIB] = b"\x11" * (64 * KIB)
    data[3 * MIB : 3 * MIB + 128 * KIB] = b"\x22" * (128 * KIB)
    return bytes(data)


@pytest.mark.e2e
def test_real_export_extents_and_ordered_reads(tmp_path: Path, exports: Exports) -> None:
    sock = exports.start(small_disk(tmp_path))
    with NbdSource(sock, "drive-scsi0") as source:
        assert source.size == 4 * MIB and not source.can_trim
        data = source.data_extents()
        assert data == [(MIB, 64 * KIB), (3 * MIB, 128 * KIB)]  # the zeroed 2M is no data
        with pytest.raises(NbdError, match="no dirty bitmap"):
            source.dirty_extents()
        pool = BufferPool()
        jobs = [whole(off, 64 * KIB) for off in range(0, 4 * MIB, 64 * KIB)]
        got = bytearray()
        for _, buf, view in read_in_order(source, jobs, pool):
            got += view
            pool.give(buf)
        assert bytes(got) == expected_bytes()
        Trimmer(source).add([(0, MIB)])  # read-only export: a no-op, not an error


@pytest.mark.e2e
def test_real_export_dirty_bitmap_context(tmp_path: Path, exports: Exports) -> None:
    disk = small_disk(tmp_path)
    run("qemu-img", "bitmap", "--add", "-g", "64K", str(disk), "bm1")
    qemu_io(disk, "write -P 0x33 512K 4K", "write -P 0x44 2M 128K")
    sock = exports.start(disk, bitmap="bm1")
    with NbdSource(sock, "drive-scsi0", "bm1") as source:
        dirty = source.dirty_extents()
        assert dirty == [(512 * KIB, 64 * KIB), (2 * MIB, 128 * KIB)]
        with pytest.raises(NbdError, match="base:allocation was not requested"):
            source.data_extents()
        pool = BufferPool()
        for job, buf, view in read_in_order(source, [whole(*r) for r in dirty], pool):
            assert bytes(view[:4096]) == (b"\x33" if job.offset == 512 * KIB else b"\x44") * 4096
            pool.give(buf)
    with pytest.raises(NbdError, match="does not offer qemu:dirty-bitmap:nope"):
        NbdSource(sock, "drive-scsi0", "nope")


@pytest.mark.e2e
def test_real_export_discards_what_was_stored(tmp_path: Path, exports: Exports) -> None:
    disk = small_disk(tmp_path)
    sock = exports.start(disk, writable=True)
    with NbdSource(sock, "drive-scsi0") as source:
        assert source.can_trim
        trimmer = Trimmer(source)
        trimmer.add([(3 * MIB, 64 * KIB), (3 * MIB + 64 * KIB, 64 * KIB)])
        trimmer.flush()
        assert trimmer.discarded == 128 * KIB
        assert source.data_extents() == [(MIB, 64 * KIB)]
    exports.stop()
    mapped = json.loads(run("qemu-img", "map", "--output=json", "-f", "qcow2", str(disk)))
    assert [(e["start"], e["length"]) for e in mapped if e["data"]] == [(MIB, 64 * KIB)]


def test_connecting_to_nothing_is_an_nbd_error(tmp_path: Path) -> None:
    with pytest.raises(NbdError, match="cannot connect"):
        NbdSource(str(tmp_path / "missing.sock"), "drive-scsi0")
