"""``config.json``: what a store is, fixed at creation; and bounded reads of metadata.

Threat: the config and every metadata object are storage content; sizes are
bounded before reading, fields typed one by one.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any, Final

from pvebackup.api.errors import CorruptIndexError, UnsupportedError
from pvebackup.store.backends.base import Backend
from pvebackup.store.formats import (
    CONFIG_FORMAT,
    FORMAT_VERSION,
    MAX_CONFIG_SIZE,
    STORE_FORMAT_IDS,
)
from pvebackup.store.index import check_chunk_size
from pvebackup.store.pack import DEFAULT_PACK_SIZE, MAX_TARGET_PACK_SIZE, MIN_PACK_SIZE

__all__ = ["CONFIG_KEY", "StoreConfig", "get_bounded"]

CONFIG_KEY: Final = "config.json"
_MIN_LEVEL: Final = -7  # zstd's fast levels go lower; nobody needs them for backups
_MAX_LEVEL: Final = 22


@dataclass(frozen=True, slots=True)
class StoreConfig:
    """``config.json``: what a store is, fixed at creation."""

    store_id: str
    created: int
    chunk_size: int
    compression_level: int
    encrypted: bool
    key_fingerprint: str | None
    key_check: str | None
    pack_size: int = DEFAULT_PACK_SIZE

    def to_bytes(self) -> bytes:
        doc = {
            "format": CONFIG_FORMAT,
            "version": FORMAT_VERSION,
            "formats": STORE_FORMAT_IDS,
            "pack_size": self.pack_size,
            "store_id": self.store_id,
            "created": self.created,
            "chunk_size": self.chunk_size,
            "compression_level": self.compression_level,
            "encrypted": self.encrypted,
            "key_fingerprint": self.key_fingerprint,
            "key_check": self.key_check,
        }
        return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode("ascii")

    @classmethod
    def from_bytes(cls, data: bytes) -> StoreConfig:
        """Parse ``config.json``; ``CorruptIndexError`` if it is not one, field by field.

        Hostile input: a string for an int, a list for a dict, NaN, a nesting bomb.
        """

        def typed(value: Any, t: type | tuple[type, ...]) -> Any:
            if not isinstance(value, t) or (t is int and isinstance(value, bool)):
                raise TypeError(f"{value!r:.80} is not {t}")
            return value

        if len(data) > MAX_CONFIG_SIZE:
            raise CorruptIndexError(f"{CONFIG_KEY}: {len(data)} bytes, too large for a config")
        try:
            doc: Any = json.loads(data)
            if not isinstance(doc, dict) or doc.get("format") != CONFIG_FORMAT:
                raise ValueError("not a pvebackup store config")
            if doc.get("version") == 1:
                raise UnsupportedError(
                    "this store has format 1 (one file per chunk, written by a development "
                    "version); format 2 (packs) is required: create a new store"
                )
            if doc.get("version") != FORMAT_VERSION:
                raise ValueError(f"unsupported store version {doc.get('version')!r:.40}")
            if typed(doc["formats"], dict) != STORE_FORMAT_IDS:
                raise UnsupportedError(
                    f"{CONFIG_KEY}: unknown algorithms or layouts {doc.get('formats')!r:.200}; "
                    f"this version knows {STORE_FORMAT_IDS}"
                )
            pack_size = typed(doc["pack_size"], int)
            if not MIN_PACK_SIZE <= pack_size <= MAX_TARGET_PACK_SIZE:
                raise ValueError(f"pack size {pack_size} out of range")
            level = typed(doc["compression_level"], int)
            if not _MIN_LEVEL <= level <= _MAX_LEVEL:
                raise ValueError(f"compression level {level} out of range")
            created = typed(doc["created"], int)
            if not 0 <= created < 1 << 62:
                raise ValueError(f"created {created} out of range")
            cfg = cls(
                store_id=str(uuid.UUID(typed(doc["store_id"], str))),
                created=created,
                chunk_size=check_chunk_size(typed(doc["chunk_size"], int)),
                compression_level=level,
                encrypted=typed(doc["encrypted"], bool),
                key_fingerprint=typed(doc["key_fingerprint"], (str, type(None))),
                key_check=typed(doc["key_check"], (str, type(None))),
                pack_size=pack_size,
            )
        except (KeyError, TypeError, ValueError, RecursionError) as exc:
            raise CorruptIndexError(f"{CONFIG_KEY}: {exc}") from exc
        if cfg.encrypted and not (
            isinstance(cfg.key_check, str) and isinstance(cfg.key_fingerprint, str)
        ):
            raise CorruptIndexError(f"{CONFIG_KEY}: encrypted store without key check")
        return cfg


def get_bounded(backend: Backend, key: str, limit: int) -> bytes:
    """``backend.get(key)``, refused before reading when the object exceeds ``limit``.

    A metadata object replaced by a huge file must not be read into memory whole.
    """
    size = backend.stat(key).size
    if size > limit:
        raise CorruptIndexError(f"{key}: {size} bytes, more than the {limit} it may have")
    data = backend.get(key)
    if len(data) > limit:  # it grew between stat and get
        raise CorruptIndexError(f"{key}: more than the {limit} bytes it may have")
    return data
