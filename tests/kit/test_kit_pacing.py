"""The one token bucket and the one progress logger of every provider (kit.pacing)."""

from __future__ import annotations

import io

from pvebackup.kit.pacing import MIB, PacedReader, ProgressLog, TokenBucket


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds > 0
        self.now += seconds


def test_unlimited_never_sleeps() -> None:
    def boom(seconds: float) -> None:
        raise AssertionError("slept")

    for rate in (None, 0, -5):
        bucket = TokenBucket(rate, sleep=boom)
        for _ in range(100):
            bucket.consume(1 << 30)


def test_average_rate_holds_for_requests_bigger_than_the_burst() -> None:
    clock = FakeClock()
    bucket = TokenBucket(1_000_000, clock=clock, sleep=clock.sleep)
    for _ in range(40):
        bucket.consume(256 * 1024)
    # 10 MiB at 1 MB/s: about 10.5 s, minus the initial burst (a quarter second).
    assert 10.2 <= clock.now - 100.0 <= 10.3
    assert abs(bucket.waited - (clock.now - 100.0)) < 1e-9


def test_small_requests_within_burst_do_not_wait() -> None:
    clock = FakeClock()
    bucket = TokenBucket(1_000_000, clock=clock, sleep=clock.sleep)
    bucket.consume(100_000)
    assert clock.now == 100.0


def test_idle_time_buys_at_most_one_burst() -> None:
    clock = FakeClock()
    bucket = TokenBucket(MIB, clock=clock, sleep=clock.sleep)
    bucket.consume(MIB)
    clock.now += 60  # idle for a minute: refills a quarter second, not 60 s
    start = clock.now
    bucket.consume(2 * MIB)
    assert clock.now - start == 1.75


def test_progress_logs_at_interval_and_at_the_end() -> None:
    clock = FakeClock()
    lines: list[tuple[str, str]] = []
    progress = ProgressLog(
        lambda level, msg: lines.append((level, msg)),
        "drive-scsi0",
        10 * MIB,
        clock=clock,
        interval=3.0,
    )
    for _ in range(10):
        clock.now += 1
        progress.advance(MIB)
    progress.finish()
    assert [level for level, _ in lines] == ["info"] * 4  # at 3 s, 6 s, 9 s and the end
    assert lines[0][1] == "drive-scsi0: 30% (3.0 of 10.0 MiB), 1.0 MiB/s"
    assert lines[-1][1] == "drive-scsi0: 100% (10.0 of 10.0 MiB) in 10.0 s, 1.0 MiB/s"


def test_progress_default_interval_and_detail() -> None:
    clock = FakeClock()
    lines: list[str] = []
    progress = ProgressLog(
        lambda level, msg: lines.append(msg), "d", 100 * MIB, clock=clock, detail=lambda: "x 1"
    )
    for done in range(1, 11):
        clock.now += 1
        progress.update(done * MIB)
    assert lines == [
        "d: 5% (5.0 of 100.0 MiB), 1.0 MiB/s, x 1",
        "d: 10% (10.0 of 100.0 MiB), 1.0 MiB/s, x 1",
    ]


def test_progress_no_periodic_line_once_complete() -> None:
    # The final line says 100 %; a periodic one just before it would repeat it.
    clock = FakeClock()
    lines: list[str] = []
    progress = ProgressLog(lambda level, msg: lines.append(msg), "d", MIB, clock=clock)
    clock.now += 60
    progress.advance(MIB)
    progress.finish()
    assert lines == ["d: 100% (1.0 of 1.0 MiB) in 60.0 s, 0.0 MiB/s"]


def test_paced_reader_counts_and_limits() -> None:
    clock = FakeClock()
    lines: list[tuple[str, str]] = []
    progress = ProgressLog(lambda lv, m: lines.append((lv, m)), "ct", None, clock=clock)
    reader = PacedReader(
        io.BytesIO(b"x" * (2 * MIB)),
        TokenBucket(MIB, clock=clock, sleep=clock.sleep),
        progress,
    )
    assert len(reader.read(MIB)) == MIB
    assert len(reader.read()) == MIB
    assert progress.done == 2 * MIB
    assert clock.now - 100.0 == 1.75  # 2 MiB at 1 MiB/s, a quarter second of burst
    progress.finish()
    assert lines[-1][1].startswith("ct: 2.0 MiB in 1.8 s")
