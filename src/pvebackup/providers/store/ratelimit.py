"""A token bucket that keeps NBD reads under ``bandwidth_limit`` bytes per second."""

from __future__ import annotations

import time
from collections.abc import Callable

__all__ = ["TokenBucket"]


class TokenBucket:
    """Allow ``rate`` bytes per second on average, bursts of at most ``burst`` bytes.

    :meth:`consume` takes the bytes at once and, when that drives the balance
    negative, sleeps until it is paid back, so reads average out to ``rate``.
    ``rate`` ``None`` or ``0`` means unlimited: :meth:`consume` returns at once.
    """

    def __init__(
        self,
        rate: int | None,
        burst: int | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.rate = rate if rate and rate > 0 else None
        # A quarter of a second's worth: smooth enough, and small requests never wait
        # on an idle link.
        self.burst = burst if burst is not None else max(1, (self.rate or 0) // 4)
        self._clock = clock
        self._sleep = sleep
        self._tokens = float(self.burst)
        self._stamp = clock()
        self.waited = 0.0
        """Seconds spent sleeping so far (for the progress log)."""

    def consume(self, amount: int) -> None:
        """Take ``amount`` bytes from the bucket, sleeping as long as needed."""
        if self.rate is None or amount <= 0:
            return
        now = self._clock()
        self._tokens = min(float(self.burst), self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now
        # Take the bytes now and pay the debt by sleeping: the next refill counts the
        # sleep, so the average stays at ``rate`` without a retry loop.
        self._tokens -= amount
        if self._tokens < 0:
            delay = -self._tokens / self.rate
            self.waited += delay
            self._sleep(delay)
