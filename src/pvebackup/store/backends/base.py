"""The contract every store backend fulfils: opaque string keys to bytes.

Backends know nothing of chunks, indexes or snapshots; the datastore decides the
key layout (``config.json``, ``chunks/ab/<digest>``, ``snapshots/...``). The
contract is shaped so that S3-compatible object storage fits it: no rename, no
append, no partial writes, listing by prefix only.

Keys: non-empty strings of printable ASCII without backslash, made of
``/``-separated segments that are not empty and do not start with ``.`` (such names
are the backends' own, e.g. temporary files; see ``validate_key``). A key names an
object; the same string is never both an object and a "directory" prefix of other
objects (the datastore's layout guarantees it).

Errors: a missing key on ``get``/``stat`` is ``ObjectNotFoundError``; a failure
that retrying cannot fix (disk full, permission denied, read-only filesystem, bad
key) is ``PermanentBackendError``; one that may go away (timeouts, throttling,
interrupted I/O) is ``TransientBackendError``. Backends raise nothing else on
purpose (``ValueError`` for a malformed key is mapped to ``PermanentBackendError``),
except ``UnsafeStorageError`` from a file-system backend that meets a symlink or
special file in the store (tampering: neither retrying nor "not found" fits).

Concurrency: every method may be called from several threads at once and from
several processes on the same store at once.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from pvebackup.api.errors import PermanentBackendError

__all__ = ["Backend", "ObjectInfo", "check_range", "validate_key"]


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    """What ``stat`` reports: size in bytes and last modification (seconds, epoch).

    ``tag``: the server's entity tag where it has one (S3's ETag, unquoted; for
    an object written with one plain PUT, the MD5 of its bytes), else ``""``.
    """

    size: int
    mtime: float
    tag: str = ""


# A key: segments joined by "/"; each segment printable ASCII without space, "/"
# or backslash, not empty and not starting with ".". One regex: this runs per chunk.
_SEGMENT = r"[!-\-0-\[\]-~][!-.0-\[\]-~]*"
_KEY = re.compile(rf"{_SEGMENT}(?:/{_SEGMENT})*")


def validate_key(key: str) -> str:
    """Return ``key`` if it is a valid backend key, else raise PermanentBackendError."""
    if _KEY.fullmatch(key) is None:
        raise PermanentBackendError(f"invalid backend key {key!r}")
    return key


def check_range(offset: int, length: int) -> None:
    """``PermanentBackendError`` unless ``offset`` and ``length`` are >= 0."""
    if offset < 0 or length < 0:
        raise PermanentBackendError(f"invalid range: offset {offset}, length {length}")


@runtime_checkable
class Backend(Protocol):
    """Opaque keys to bytes. See the module docstring for keys, errors, threads."""

    def get(self, key: str) -> bytes:
        """The whole object ``key``.

        MUST return exactly the bytes of one completed ``put`` (never a mix or a
        prefix). Missing: ``ObjectNotFoundError``.
        """
        ...

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        """Bytes ``[offset, offset + length)`` of object ``key`` (an S3 ranged GET).

        Shorter when the object ends first (empty past its end): the caller checks
        the length it needed. Missing: ``ObjectNotFoundError``; a negative offset
        or length: ``PermanentBackendError``.
        """
        ...

    def put(self, key: str, data: bytes, *, overwrite: bool, durable: bool = True) -> bool:
        """Store ``data`` as ``key``; return True if written, False if left alone.

        Atomic: a concurrent or later reader sees no object or the old object or
        the whole new one, never a partial one, also after a crash.
        ``overwrite=False``: if ``key`` exists, do nothing and return False; this
        is an idempotent, race-free insert (two processes inserting the same key
        both succeed, one of them writes). ``overwrite=True``: replace.
        ``durable=True``: the object survives a crash once ``put`` returns.
        ``durable=False``: the backend may delay that until the next ``sync()``
        (the object may then be missing after a crash; a local backend may also
        leave it empty, which a reader sees as a corrupt object).
        """
        ...

    def exists(self, key: str) -> bool:
        """True if ``key`` names an object. Never raises ``ObjectNotFoundError``."""
        ...

    def stat(self, key: str) -> ObjectInfo:
        """Size and modification time of ``key``. Missing: ``ObjectNotFoundError``."""
        ...

    def delete(self, key: str) -> None:
        """Remove ``key``. Idempotent: a missing key is not an error."""
        ...

    def list(self, prefix: str = "") -> Iterator[str]:
        """Every key that starts with ``prefix`` (plain string prefix), in no order.

        Objects put or deleted while the iteration runs may or may not appear.
        Temporary objects of unfinished ``put`` calls never appear.
        """
        ...

    def sync(self) -> None:
        """Make every ``put`` that returned before this call durable."""
        ...
