"""The retry wrapper: only transient errors, bounded, backed off, counted, logged."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from pvebackup.api.errors import (
    ObjectNotFoundError,
    PermanentBackendError,
    TransientBackendError,
)
from pvebackup.store.backends.base import Backend
from pvebackup.store.backends.memory import MemoryBackend
from pvebackup.store.backends.retry import RetryBackend


class Flaky(MemoryBackend):
    """Fails the first ``failures`` calls of each kind with ``error``."""

    def __init__(self, failures: int, error: Exception | None = None) -> None:
        super().__init__()
        self.failures = failures
        self.error = error or TransientBackendError("503 SlowDown")
        self.calls = 0

    def _maybe_fail(self) -> None:
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error

    def get(self, key: str) -> bytes:
        self._maybe_fail()
        return super().get(key)

    def put(self, key: str, data: bytes, *, overwrite: bool, durable: bool = True) -> bool:
        self._maybe_fail()
        return super().put(key, data, overwrite=overwrite, durable=durable)


def _wrap(inner: Backend, attempts: int = 4) -> tuple[RetryBackend, list[float]]:
    sleeps: list[float] = []
    return RetryBackend(inner, attempts=attempts, base_delay=1.0, max_delay=3.0,
                        sleep=sleeps.append, jitter=lambda: 1.0), sleeps  # fmt: skip


def test_transient_errors_are_retried_with_bounded_exponential_delays(
    caplog: pytest.LogCaptureFixture,
) -> None:
    inner = Flaky(3)
    inner.failures = 0
    inner.put("k", b"v", overwrite=False)
    inner.calls, inner.failures = 0, 3
    backend, sleeps = _wrap(inner)
    with caplog.at_level(logging.DEBUG, logger="pvebackup.store.backends.retry"):
        assert backend.get("k") == b"v"
    assert sleeps == [1.0, 2.0, 3.0]  # 1, 2, 4 capped at 3
    assert backend.retries == 3
    assert len([r for r in caplog.records if r.levelno == logging.DEBUG]) == 3
    assert "retry 1 of 3" in caplog.records[0].getMessage()


def test_jitter_spreads_the_delay() -> None:
    backend = RetryBackend(Flaky(1), base_delay=1.0, sleep=lambda _: None, jitter=lambda: 0.25)
    assert backend._delay(2) == 1.0  # 0.25 * 4


def test_gives_up_after_the_bound_and_raises_the_transient_error() -> None:
    backend, sleeps = _wrap(Flaky(10), attempts=3)
    with pytest.raises(TransientBackendError, match="SlowDown"):
        backend.put("k", b"v", overwrite=True)
    assert len(sleeps) == 2 and backend.retries == 2


@pytest.mark.parametrize(
    "error",
    [PermanentBackendError("403 AccessDenied"), ObjectNotFoundError("404"), ValueError("bug")],
)
def test_other_errors_are_never_retried(error: Exception) -> None:
    inner = Flaky(1, error)
    backend, sleeps = _wrap(inner)
    with pytest.raises(type(error)):
        backend.put("k", b"v", overwrite=True)
    assert inner.calls == 1 and sleeps == [] and backend.retries == 0


class FlakyList(MemoryBackend):
    """Its first listing fails after two keys."""

    def __init__(self) -> None:
        super().__init__()
        self.listings = 0

    def list(self, prefix: str = "") -> Iterator[str]:
        self.listings += 1
        for n, key in enumerate(sorted(super().list(prefix))):
            if self.listings == 1 and n == 2:
                raise TransientBackendError("connection reset")
            yield key


def test_a_listing_broken_in_the_middle_restarts_without_duplicates() -> None:
    inner = FlakyList()
    for i in range(5):
        inner.put(f"k{i}", b"v", overwrite=False)
    backend, sleeps = _wrap(inner)
    assert list(backend.list()) == [f"k{i}" for i in range(5)]
    assert inner.listings == 2 and backend.retries == 1


def test_attempts_must_be_positive() -> None:
    with pytest.raises(ValueError):
        RetryBackend(MemoryBackend(), attempts=0)
