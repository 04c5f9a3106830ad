"""An in-memory backend for unit tests: a dict behind a lock, same contract."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

from pvebackup.api.errors import ObjectNotFoundError
from pvebackup.store.backends.base import ObjectInfo, check_range, validate_key

__all__ = ["MemoryBackend"]


class MemoryBackend:
    """Objects live in this process only; ``sync`` has nothing to do."""

    def __init__(self) -> None:
        self._objects: dict[str, tuple[bytes, float]] = {}
        self._lock = threading.Lock()

    def get(self, key: str) -> bytes:
        validate_key(key)
        with self._lock:
            entry = self._objects.get(key)
        if entry is None:
            raise ObjectNotFoundError(f"no object {key!r}")
        return entry[0]

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        check_range(offset, length)
        return self.get(key)[offset : offset + length]

    def put(self, key: str, data: bytes, *, overwrite: bool, durable: bool = True) -> bool:
        validate_key(key)
        with self._lock:
            if not overwrite and key in self._objects:
                return False
            self._objects[key] = (bytes(data), time.time())
            return True

    def exists(self, key: str) -> bool:
        validate_key(key)
        with self._lock:
            return key in self._objects

    def stat(self, key: str) -> ObjectInfo:
        validate_key(key)
        with self._lock:
            entry = self._objects.get(key)
        if entry is None:
            raise ObjectNotFoundError(f"no object {key!r}")
        return ObjectInfo(len(entry[0]), entry[1])

    def delete(self, key: str) -> None:
        validate_key(key)
        with self._lock:
            self._objects.pop(key, None)

    def list(self, prefix: str = "") -> Iterator[str]:
        with self._lock:
            keys = [k for k in self._objects if k.startswith(prefix)]
        return iter(keys)

    def sync(self) -> None:
        return None

    def __repr__(self) -> str:
        return f"MemoryBackend({len(self._objects)} objects)"
