"""A backend wrapper that retries transient failures: bounded, with back-off and jitter.

Object stores fail now and then in ways that go away: 503 SlowDown, 500, a reset
connection, a timeout. The wrapped backend reports those as
:class:`~pvebackup.api.errors.TransientBackendError` (and nothing else is retried:
a 403, a missing key, a full disk stay what they are). Each call is tried at most
``attempts`` times; before try ``n + 1`` it sleeps a random time in
``[0, min(max_delay, base_delay * 2**n)]`` ("full jitter": many writers that
failed together do not come back together). Every retry is logged at debug level
and counted (:attr:`RetryBackend.retries`), so the job summary can say how many
requests the store needed twice.

Retrying is safe because every operation of the contract is idempotent: a
``put`` is whole-object, ``delete`` of a missing key is no error. One subtlety: a
``put(overwrite=False)`` whose first try was stored but whose answer was lost
returns False on the retry ("already there"), which is true and harmless for
the datastore (it treats an existing key as written). ``list`` is restarted
after a failure in the middle, without yielding a key twice.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from pvebackup.api.errors import TransientBackendError
from pvebackup.store.backends.base import Backend, ObjectInfo

__all__ = ["RetryBackend"]

_log = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_ATTEMPTS = 6
DEFAULT_BASE_DELAY = 0.2
DEFAULT_MAX_DELAY = 10.0


class RetryBackend:
    """``inner`` with transient errors retried (see the module docstring)."""

    def __init__(
        self,
        inner: Backend,
        *,
        attempts: int = DEFAULT_ATTEMPTS,
        base_delay: float = DEFAULT_BASE_DELAY,
        max_delay: float = DEFAULT_MAX_DELAY,
        sleep: Callable[[float], None] = time.sleep,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        if attempts < 1:
            raise ValueError("attempts must be at least 1")
        self.inner = inner
        self._attempts = attempts
        self._base = base_delay
        self._max = max_delay
        self._sleep = sleep
        self._jitter = jitter
        self._lock = threading.Lock()
        self._retries = 0

    def __repr__(self) -> str:
        return f"RetryBackend({self.inner!r})"

    @property
    def retries(self) -> int:
        """How many requests were retried so far (all threads)."""
        with self._lock:
            return self._retries

    def close(self) -> None:
        close = getattr(self.inner, "close", None)
        if close is not None:
            close()

    def _delay(self, failed: int) -> float:
        return float(self._jitter() * min(self._max, self._base * (2**failed)))

    def _retry(self, what: str, call: Callable[[], T]) -> T:
        failed = 0
        while True:
            try:
                return call()
            except TransientBackendError as exc:
                failed += 1
                if failed >= self._attempts:
                    raise
                delay = self._delay(failed - 1)
                with self._lock:
                    self._retries += 1
                _log.debug("%s failed (%s); retry %d of %d in %.2f s",
                           what, exc, failed, self._attempts - 1, delay)  # fmt: skip
                self._sleep(delay)

    def get(self, key: str) -> bytes:
        return self._retry(f"get {key}", lambda: self.inner.get(key))

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        return self._retry(
            f"get_range {key}", lambda: self.inner.get_range(key, offset, length)
        )

    def put(self, key: str, data: bytes, *, overwrite: bool, durable: bool = True) -> bool:
        return self._retry(
            f"put {key}",
            lambda: self.inner.put(key, data, overwrite=overwrite, durable=durable),
        )

    def exists(self, key: str) -> bool:
        return self._retry(f"exists {key}", lambda: self.inner.exists(key))

    def stat(self, key: str) -> ObjectInfo:
        return self._retry(f"stat {key}", lambda: self.inner.stat(key))

    def delete(self, key: str) -> None:
        self._retry(f"delete {key}", lambda: self.inner.delete(key))

    def list(self, prefix: str = "") -> Iterator[str]:
        return (key for key, _ in self._list(prefix, self.inner.list, lambda key: (key, None)))

    def list_info(self, prefix: str = "") -> Iterator[tuple[str, ObjectInfo]]:
        """The inner backend's ``list_info`` (``AttributeError`` if it has none),
        restarted after a failure as ``list`` is."""
        inner: Callable[[str], Iterator[tuple[str, ObjectInfo]]] = self.inner.list_info  # type: ignore[attr-defined]
        for key, info in self._list(prefix, inner, lambda item: item):
            assert info is not None
            yield key, info

    def _list(
        self,
        prefix: str,
        source: Callable[[str], Iterator[Any]],
        split: Callable[[Any], tuple[str, ObjectInfo | None]],
    ) -> Iterator[tuple[str, ObjectInfo | None]]:
        seen: set[str] = set()
        failed = 0
        while True:
            try:
                for item in source(prefix):
                    key, info = split(item)
                    if key not in seen:
                        seen.add(key)
                        yield key, info
                return
            except TransientBackendError as exc:
                failed += 1
                if failed >= self._attempts:
                    raise
                delay = self._delay(failed - 1)
                with self._lock:
                    self._retries += 1
                _log.debug("list %r failed (%s); restarting it, retry %d of %d in %.2f s",
                           prefix, exc, failed, self._attempts - 1, delay)  # fmt: skip
                self._sleep(delay)

    def sync(self) -> None:
        self._retry("sync", self.inner.sync)
