"""A host-side cache of small store objects (manifests, notes, verify states).

``list`` of a store in a bucket would otherwise GET every snapshot's manifest and
sidecars on every call: thousands of requests for a large store. One listing of
``snapshots/`` gives every object's size and ETag; an object whose ETag is the one
cached is read from here instead.

Staleness, also against other nodes writing the bucket: an entry is served only
for the exact ``(key, tag)`` the current listing shows (S3 and RGW lists are
strongly consistent), and it is *stored* only when the MD5 of the bytes we read
equals that tag (the ETag of a plain PUT is the MD5 of its bytes). So an object
another node replaced between our listing and our read is not cached under the
old tag; an ETag that is no MD5 (multipart, SSE-KMS) is never cached, only read.
Nothing is ever served without a listing naming its tag.

Files: ``DIR/<sha256(key)>``: a header line ``pvebackup-metacache 1 <tag>
<key>`` then the bytes. Written atomically (temporary file, rename); a damaged or
foreign file is a miss. The directory is host state (0700, never in the
storage); what it holds is parsed and verified again on every use (a manifest's
signature, a note's limits), so even a corrupted cache cannot inject content.
Cache errors are never fatal: the store is the truth, the cache an optimisation.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
from collections.abc import Iterable
from pathlib import Path
from typing import Final

__all__ = ["MetaCache", "md5_tag"]

_MAGIC: Final = b"pvebackup-metacache 1 "
_MD5: Final = re.compile(r"[0-9a-f]{32}")


def md5_tag(tag: str) -> bool:
    """True if ``tag`` is a plain MD5 ETag (what :meth:`MetaCache.put` can check)."""
    return _MD5.fullmatch(tag) is not None


class MetaCache:
    """Objects of one store by ``(key, tag)``, in directory ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.hits = 0
        self.misses = 0

    def _path(self, key: str) -> Path:
        return self.root / hashlib.sha256(key.encode()).hexdigest()

    def get(self, key: str, tag: str, size: int) -> bytes | None:
        """The cached bytes of ``key`` at ``tag`` (``size`` bytes), else None."""
        if not md5_tag(tag):
            return None
        try:
            raw = self._path(key).read_bytes()
        except OSError:
            self.misses += 1
            return None
        head, sep, data = raw.partition(b"\n")
        if (
            not sep
            or head != _MAGIC + f"{tag} {key}".encode()
            or len(data) != size
            or hashlib.md5(data, usedforsecurity=False).hexdigest() != tag
        ):
            self.misses += 1
            return None
        self.hits += 1
        return data

    def put(self, key: str, tag: str, data: bytes) -> None:
        """Remember ``data`` as ``key`` at ``tag`` if ``tag`` is its MD5 (see above)."""
        if not md5_tag(tag) or hashlib.md5(data, usedforsecurity=False).hexdigest() != tag:
            return
        path = self._path(key)
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
        try:
            self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
            with open(tmp, "xb") as f:
                f.write(_MAGIC + f"{tag} {key}".encode() + b"\n" + data)
            os.replace(tmp, path)
        except OSError:
            tmp.unlink(missing_ok=True)

    def retain(self, keys: Iterable[str]) -> int:
        """Drop the entries of every key not in ``keys`` (a complete listing, so
        the directory does not grow with removed snapshots); returns how many."""
        keep = {self._path(k).name for k in keys}
        dropped = 0
        try:
            names = os.listdir(self.root)
        except OSError:
            return 0
        for name in names:
            if name not in keep:
                try:
                    (self.root / name).unlink()
                    dropped += 1
                except OSError:
                    pass
        return dropped
