"""Retention: which backups of one guest a prune keeps, with Proxmox's exact semantics.

The rule (Proxmox Backup Server's ``compute_prune_info``, which Proxmox VE's
``prune_mark_backup_group`` matches):

- Backups are walked newest first. Protected backups are marked ``PROTECTED`` when
  met: they use no keep slot and cover no period, and are never removed.
- The options are applied in the order last, hourly, daily, weekly, monthly,
  yearly. Each maps a backup to a period (last: the backup itself; hourly:
  ``%Y/%m/%d/%H``; daily: ``%Y/%m/%d``; weekly: the ISO week ``%G/%V``, so
  2019-12-31 is in 2020-W01; monthly: ``%Y/%m``; yearly: ``%Y``), in local time
  of the given zone.
- A period that holds a backup an earlier option already kept is skipped, not
  counted. Otherwise the newest unmarked backup of each new period is kept until
  ``N`` periods are taken; the older backups of a taken period are marked remove,
  and a backup marked by one option is never re-marked by a later one.
- What is left unmarked at the end is removed.
- No option > 0 (and no ``keep-all``) keeps everything, as Proxmox VE and PBS's
  API do; ``keep_all_fallback=False`` gives PBS's raw marking (remove all).

Example (keep-last=1, keep-daily=2; backups on day 3 at 12:00 and 08:00, day 2 at
20:00, day 1 at 10:00): keep-last keeps day 3 12:00; keep-daily skips day 3
(already covered), keeps day 2 20:00 and day 1 10:00; day 3 08:00 is removed.

Pure: no I/O, no clock. Both providers and the CLI import it.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from datetime import datetime, tzinfo
from typing import Generic, TypeVar

__all__ = [
    "KeepOptions",
    "Mark",
    "PruneCandidate",
    "format_keep_options",
    "mark_prune",
    "parse_keep_options",
]

Key = TypeVar("Key", bound=Hashable)


class Mark(enum.Enum):
    KEEP = "keep"
    REMOVE = "remove"
    PROTECTED = "protected"


@dataclass(frozen=True)
class KeepOptions:
    """Numbers of periods to keep; 0 = option not set."""

    last: int = 0
    hourly: int = 0
    daily: int = 0
    weekly: int = 0
    monthly: int = 0
    yearly: int = 0
    keep_all: bool = False

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name != "keep_all" and (not isinstance(value, int) or value < 0):
                raise ValueError(f"keep-{f.name} must be a non-negative integer, not {value!r}")

    def keeps_something(self) -> bool:
        return self.keep_all or any(
            n > 0
            for n in (self.last, self.hourly, self.daily, self.weekly, self.monthly, self.yearly)
        )


@dataclass(frozen=True)
class PruneCandidate(Generic[Key]):
    """One backup of a group: ``key`` identifies it to the caller (e.g. its volume name)."""

    key: Key
    ctime: int
    protected: bool = False


_PERIODS: tuple[tuple[str, str | None], ...] = (
    ("last", None),
    ("hourly", "%Y/%m/%d/%H"),
    ("daily", "%Y/%m/%d"),
    ("weekly", "%G/%V"),
    ("monthly", "%Y/%m"),
    ("yearly", "%Y"),
)


def mark_prune(
    backups: Iterable[PruneCandidate[Key]],
    options: KeepOptions,
    tz: tzinfo | None,
    *,
    keep_all_fallback: bool = True,
) -> dict[Key, Mark]:
    """Mark every backup of one group KEEP, REMOVE or PROTECTED (see the module doc).

    Ties on ``ctime`` are ordered by nothing stable; callers pass unique ctimes per
    group (the volume names carry the second).
    """
    ordered: Sequence[PruneCandidate[Key]] = sorted(backups, key=lambda b: b.ctime, reverse=True)
    marks: dict[Key, Mark] = {}
    if options.keep_all or (keep_all_fallback and not options.keeps_something()):
        return {b.key: (Mark.PROTECTED if b.protected else Mark.KEEP) for b in ordered}

    def period_of(fmt: str | None) -> Callable[[PruneCandidate[Key]], Hashable]:
        if fmt is None:
            return lambda b: ("id", b.key)
        return lambda b: datetime.fromtimestamp(b.ctime, tz).strftime(fmt)

    for name, fmt in _PERIODS:
        keep = int(getattr(options, name))
        if keep > 0:
            _mark_selection(marks, ordered, keep, period_of(fmt))
    for b in ordered:
        marks.setdefault(b.key, Mark.PROTECTED if b.protected else Mark.REMOVE)
    return marks


def _mark_selection(
    marks: dict[Key, Mark],
    ordered: Sequence[PruneCandidate[Key]],
    keep: int,
    period: Callable[[PruneCandidate[Key]], Hashable],
) -> None:
    # periods an earlier option already kept a backup in: skipped, not counted
    covered = {period(b) for b in ordered if marks.get(b.key) is Mark.KEEP}
    taken: set[Hashable] = set()
    for b in ordered:
        if b.key in marks:
            continue
        if b.protected:
            marks[b.key] = Mark.PROTECTED
            continue
        p = period(b)
        if p in covered:
            continue
        if p in taken:
            marks[b.key] = Mark.REMOVE
            continue
        if len(taken) >= keep:
            break
        taken.add(p)
        marks[b.key] = Mark.KEEP


_OPTION = re.compile(r"keep-(all|last|hourly|daily|weekly|monthly|yearly)=([0-9]{1,9})")


def parse_keep_options(text: str) -> KeepOptions:
    """Proxmox VE's ``prune-backups`` syntax: ``keep-last=3,keep-daily=7`` (``keep-all=1``).

    :raises ValueError: unknown, repeated or malformed options.
    """
    values: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        m = _OPTION.fullmatch(part)
        if m is None:
            raise ValueError(
                f"{part[:40]!r} is no prune option: write keep-last=N, keep-hourly=N, "
                "keep-daily=N, keep-weekly=N, keep-monthly=N, keep-yearly=N or keep-all=1"
            )
        if m.group(1) in values:
            raise ValueError(f"keep-{m.group(1)} given twice")
        values[m.group(1)] = int(m.group(2))
    keep_all = bool(values.pop("all", 0))
    if keep_all and any(values.values()):
        raise ValueError("keep-all=1 cannot be combined with other keep options")
    return KeepOptions(keep_all=keep_all, **values)


def format_keep_options(options: KeepOptions | Mapping[str, int]) -> str:
    """The inverse of :func:`parse_keep_options` (options set only)."""
    if isinstance(options, KeepOptions):
        if options.keep_all:
            return "keep-all=1"
        options = {name: getattr(options, name) for name, _ in _PERIODS}
    return ",".join(f"keep-{k}={v}" for k, v in options.items() if v)
