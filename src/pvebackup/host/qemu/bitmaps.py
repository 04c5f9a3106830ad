"""Which dirty bitmap a disk's backup uses, decided before QEMU opens the image.

A provider asks for a ``bitmap_id``; per (storage, bitmap id) each qcow2 disk holds
one persistent bitmap ``pvebackup-<storeid>-<bitmap_id>`` ("B") recording the
writes since the last successful backup with that id. During a backup a second
bitmap ``B+next`` records the writes made since backup start. The decision here
is made from ``qemu-img info`` while nothing has the image open:

- raw image: ``none`` (raw cannot hold persistent bitmaps), logged at info;
- no ``bitmap_id``: ``none``; this storage's stale bitmaps are removed;
- B missing: ``new``;
- B inconsistent: ``new`` after removing it, logged at warn. Inconsistent means
  flagged ``in-use`` (its writer died), not enabled (a backup's daemon went away
  before it finished the bitmaps), or a ``B+next`` is left over (same cause);
- otherwise ``reuse``.

``new`` always means a full read, so a bitmap that cannot be trusted never turns
into a silent gap.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field

from pvebackup.api.types import BitmapMode, LogFunction, LogLevel
from pvebackup.kit.qemuimg import ImageInfo

__all__ = [
    "BITMAP_PREFIX",
    "BitmapPlan",
    "bitmap_name",
    "next_bitmap_name",
    "plan_bitmap",
    "storage_prefix",
]

BITMAP_PREFIX = "pvebackup-"
_NEXT_SUFFIX = "+next"  # '+' never occurs in a sanitized name: no collision possible
_STOREID_OK = re.compile(r"[A-Za-z0-9_.]+")
_ID_OK = re.compile(r"[A-Za-z0-9_.-]+")
_MAX_PART = 200  # qcow2 allows 1023 bytes per name; stay far below


def _sanitize(part: str, allowed: re.Pattern[str]) -> str:
    if allowed.fullmatch(part) and len(part) <= _MAX_PART:
        return part
    # Replace what QEMU/NBD meta-context names should not carry and keep names
    # apart with a digest of the original.
    digest = hashlib.sha256(part.encode()).hexdigest()[:12]
    cleaned = re.sub(r"[^A-Za-z0-9_.]", "_", part)[: _MAX_PART - 13]
    return f"{cleaned}_{digest}"


def storage_prefix(storeid: str) -> str:
    """Prefix of every bitmap belonging to ``storeid``.

    A storeid may contain ``-``; it is sanitized to a form without ``-`` so that
    the prefix of storage ``a`` never matches the bitmaps of storage ``a-b``.
    """
    return f"{BITMAP_PREFIX}{_sanitize(storeid, _STOREID_OK)}-"


def bitmap_name(storeid: str, bitmap_id: str) -> str:
    """The persistent bitmap for (``storeid``, ``bitmap_id``), as QEMU accepts it."""
    return storage_prefix(storeid) + _sanitize(bitmap_id, _ID_OK)


def next_bitmap_name(name: str) -> str:
    """The bitmap recording writes made during a backup using ``name``."""
    return name + _NEXT_SUFFIX


@dataclass(frozen=True, slots=True)
class BitmapPlan:
    """The decision for one disk.

    ``name``/``next_name`` are None in mode ``none``; ``remove`` lists bitmaps to
    delete from the image before the backup starts.
    """

    mode: BitmapMode
    name: str | None
    next_name: str | None
    remove: tuple[str, ...] = field(default=())


def plan_bitmap(
    info: ImageInfo,
    *,
    devicename: str,
    storeid: str,
    bitmap_id: str | None,
    log: LogFunction,
) -> BitmapPlan:
    """Decide the bitmap mode of one disk from its ``qemu-img info`` (see module doc)."""
    if info.format != "qcow2":
        if bitmap_id is not None:
            log(
                LogLevel.INFO,
                f"{devicename}: {info.format} image cannot hold a persistent dirty bitmap,"
                " backing up the whole disk",
            )
        return BitmapPlan(BitmapMode.NONE, None, None)

    if bitmap_id is None:
        prefix = storage_prefix(storeid)
        stale = tuple(b.name for b in info.bitmaps if b.name.startswith(prefix))
        for name in stale:
            log(
                LogLevel.INFO,
                f"{devicename}: removing dirty bitmap {name}: storage {storeid} no longer uses one",
            )
        return BitmapPlan(BitmapMode.NONE, None, None, stale)

    name = bitmap_name(storeid, bitmap_id)
    next_name = next_bitmap_name(name)
    current = info.bitmap(name)
    leftover = info.bitmap(next_name)
    remove = (next_name,) if leftover is not None else ()
    if current is None:
        if leftover is not None:
            log(LogLevel.INFO, f"{devicename}: removing left-over dirty bitmap {next_name}")
        return BitmapPlan(BitmapMode.NEW, name, next_name, remove)

    reason = None
    if current.in_use:
        reason = "flagged in-use (its writer did not close the image cleanly)"
    elif not current.enabled:
        reason = "disabled (an earlier backup did not finish its bitmaps)"
    elif leftover is not None:
        reason = f"{next_name} is left over from an earlier backup that did not finish"
    if reason is not None:
        log(
            LogLevel.WARN,
            f"{devicename}: dirty bitmap {name} is inconsistent: {reason};"
            " recreating it, this backup reads the whole disk",
        )
        return BitmapPlan(BitmapMode.NEW, name, next_name, (name, *remove))
    return BitmapPlan(BitmapMode.REUSE, name, next_name)
