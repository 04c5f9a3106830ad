"""The token bucket that limits NBD reads."""

from __future__ import annotations

from pvebackup.providers.store.ratelimit import TokenBucket


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_unlimited_never_sleeps() -> None:
    clock = FakeClock()
    bucket = TokenBucket(None, clock=clock, sleep=clock.sleep)
    for _ in range(100):
        bucket.consume(1 << 30)
    assert clock.now == 0.0


def test_average_rate_holds_for_requests_bigger_than_the_burst() -> None:
    clock = FakeClock()
    bucket = TokenBucket(1_000_000, clock=clock, sleep=clock.sleep)
    for _ in range(40):
        bucket.consume(256 * 1024)
    # 10 MiB at 1 MB/s: about 10.5 s, minus the initial burst.
    assert 10.0 <= clock.now <= 10.6


def test_small_requests_within_burst_do_not_wait() -> None:
    clock = FakeClock()
    bucket = TokenBucket(1_000_000, clock=clock, sleep=clock.sleep)
    bucket.consume(100_000)
    assert clock.now == 0.0
