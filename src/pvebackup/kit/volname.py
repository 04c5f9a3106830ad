"""The one volume name scheme of our backup providers: ``backup/vm-100-2026-12-01T20:52:27Z``.

``backup/<kind>-<vmid>-<time>``, used by ``backup-dir`` and ``backup-store`` alike:

- ``backup/``: the content directory Proxmox VE names backup volumes under;
- ``<kind>``: ``vm`` for a VM (``qemu``), ``ct`` for a container (``lxc``), as
  Proxmox Backup Server names its backup groups;
- ``<vmid>``: 1 to 999999999, no leading zero;
- ``<time>``: the backup's start in UTC, ISO 8601 with seconds and ``Z`` (PBS's
  snapshot time format). Names sort by time as plain strings, a person reads
  them without converting, and there is exactly one spelling per second.

Why this one: a guest's backups on two storage types must not look like two
different things, PBS users know it, and a ``STOREID:VOLNAME`` volume id may
contain ``:`` after the first one (PVE's own PBS volume ids do). No other
spelling is parsed (nothing was released with the older ``qemu-100-2026_12_01-
20_52_27`` names of backup-dir).

Parsing is strict, because names are read from storage (hostile input): a name
must print back to itself (``0001-...`` parses but prints differently; two names
for one volume would break every lookup), and its time lies in 1970..9999.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final

from pvebackup.api.types import GuestType

__all__ = [
    "GUEST_OF",
    "KIND_OF",
    "MAX_TIME",
    "TIME_FORMAT",
    "TIME_PATTERN",
    "VMID_PATTERN",
    "BackupVolname",
    "format_time",
    "parse_time",
]

KIND_OF: Final = {GuestType.QEMU: "vm", GuestType.LXC: "ct"}
GUEST_OF: Final = {kind: guest for guest, kind in KIND_OF.items()}
MAX_TIME: Final = 253402300799
"""9999-12-31T23:59:59Z: the last time a name can show."""
TIME_FORMAT: Final = "%Y-%m-%dT%H:%M:%SZ"
TIME_PATTERN: Final = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ"
VMID_PATTERN: Final = r"[1-9]\d{0,8}"
# re.ASCII: `\d` would also match other scripts' digits ("２026"), which int() accepts.
_VOLNAME_RE: Final = re.compile(
    rf"backup/(vm|ct)-({VMID_PATTERN})-({TIME_PATTERN})", re.ASCII
)


def format_time(t: int) -> str:
    """``2026-12-01T20:52:27Z`` for Unix time ``t``."""
    return time.strftime(TIME_FORMAT, time.gmtime(t))


def parse_time(text: str) -> int:
    """Inverse of :func:`format_time`; ``ValueError`` for anything not canonical.

    An impossible date (``2026-02-31``) in a name someone else made is a
    ``ValueError`` too: callers map it to their typed error.
    """
    try:
        t = int(datetime.strptime(text, TIME_FORMAT).replace(tzinfo=UTC).timestamp())
    except ValueError as exc:
        raise ValueError(f"impossible time {text!r}") from exc
    if not 0 <= t <= MAX_TIME or format_time(t) != text:
        raise ValueError(f"time {text!r} out of range (1970..9999, canonical)")
    return t


@dataclass(frozen=True, order=True, slots=True)
class BackupVolname:
    """One backup volume name: guest type, vmid, backup time (Unix seconds, UTC)."""

    guest_type: GuestType
    vmid: int
    backup_time: int

    def __post_init__(self) -> None:
        if self.guest_type not in KIND_OF or not 0 < self.vmid < 10**9:
            raise ValueError(f"invalid backup guest {self.guest_type}/{self.vmid}")
        if not 0 <= self.backup_time <= MAX_TIME:
            raise ValueError(f"backup time {self.backup_time} out of range")

    @property
    def kind(self) -> str:
        """``vm`` or ``ct``."""
        return KIND_OF[self.guest_type]

    @property
    def time_str(self) -> str:
        """``2026-12-01T20:52:27Z``."""
        return format_time(self.backup_time)

    @property
    def dirname(self) -> str:
        """The name without ``backup/``: ``vm-100-2026-12-01T20:52:27Z``."""
        return f"{self.kind}-{self.vmid}-{self.time_str}"

    def __str__(self) -> str:
        return f"backup/{self.dirname}"

    @classmethod
    def parse(cls, volname: str) -> BackupVolname:
        """Inverse of ``str()``; ``ValueError`` naming the text if it is not one."""
        m = _VOLNAME_RE.fullmatch(volname)
        if m is None:
            raise ValueError(
                f"{volname!r} is not a backup volume name (backup/<vm|ct>-<vmid>-<UTC time>,"
                " e.g. backup/vm-100-2026-12-01T20:52:27Z)"
            )
        try:
            backup_time = parse_time(m.group(3))
        except ValueError as exc:
            raise ValueError(f"{volname!r}: {exc}") from exc
        return cls(GUEST_OF[m.group(1)], int(m.group(2)), backup_time)
