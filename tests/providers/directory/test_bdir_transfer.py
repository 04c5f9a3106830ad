"""Bandwidth limiter, progress lines, ACL id mapping (pure units)."""

from __future__ import annotations

import io
import struct

from pvebackup.providers.directory.transfer import MIB, LimitedReader, ProgressLog, RateLimiter
from pvebackup.providers.directory.xattrs import acl_to_text, map_acl_ids


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds > 0
        self.now += seconds


def test_rate_limiter_paces_reads_to_the_rate() -> None:
    clock = FakeClock()
    limiter = RateLimiter(4 * MIB, clock=clock, sleep=clock.sleep)
    for _ in range(12):
        limiter.acquire(MIB)
    assert clock.now - 100.0 == 3.0  # 12 MiB at 4 MiB/s


def test_rate_limiter_does_not_save_up_idle_time() -> None:
    clock = FakeClock()
    limiter = RateLimiter(MIB, clock=clock, sleep=clock.sleep)
    limiter.acquire(MIB)
    clock.now += 60  # idle for a minute
    start = clock.now
    limiter.acquire(2 * MIB)
    assert clock.now - start == 2.0


def test_unlimited_never_sleeps() -> None:
    def boom(seconds: float) -> None:
        raise AssertionError("slept")

    limiter = RateLimiter(None, sleep=boom)
    limiter.acquire(10**12)
    RateLimiter(0, sleep=boom).acquire(10**12)


def test_progress_logs_at_interval_and_at_the_end() -> None:
    clock = FakeClock()
    lines: list[tuple[str, str]] = []
    progress = ProgressLog(
        lambda level, msg: lines.append((level, msg)), "drive-scsi0", 10 * MIB, clock=clock
    )
    for _ in range(10):
        clock.now += 1
        progress.advance(MIB)
    progress.finish()
    assert [level for level, _ in lines] == ["info"] * 4  # at 3 s, 6 s, 9 s and the end
    assert lines[0][1] == "drive-scsi0: 30% (3.0 of 10.0 MiB), 1.0 MiB/s"
    assert lines[-1][1] == "drive-scsi0: 100% (10.0 of 10.0 MiB) in 10.0 s, 1.0 MiB/s"


def test_limited_reader_counts_and_limits() -> None:
    clock = FakeClock()
    lines: list[tuple[str, str]] = []
    progress = ProgressLog(lambda lv, m: lines.append((lv, m)), "ct", None, clock=clock)
    reader = LimitedReader(
        io.BytesIO(b"x" * (2 * MIB)), RateLimiter(MIB, clock=clock, sleep=clock.sleep), progress
    )
    assert len(reader.read(MIB)) == MIB
    assert len(reader.read()) == MIB
    assert progress.done == 2 * MIB
    assert clock.now - 100.0 == 2.0
    progress.finish()
    assert lines[-1][1].startswith("ct: 2.0 MiB in 2.0 s")


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
