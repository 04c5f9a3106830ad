"""Annotations of one backup: the operator's notes, protection, the last verify result.

Both providers keep them as *sidecars* beside the backup they annotate, under the
same names (backup-dir: files in the volume directory; backup-store: objects
under the snapshot's prefix)::

    notes               UTF-8 text, at most NOTES_MAX bytes; absent = no notes
    protected           present (whatever it holds) = protected
    verify-state.json   {"state": "ok"|"failed", "time": <Unix seconds>}

They are outside whatever pins the backup itself (backup-store's signed
manifest, backup-dir's checksummed index), as Proxmox Backup Server keeps notes
and protection outside its signed manifest: they change after the backup, by
people who may not hold the key. So whoever can write the storage can change
them, and nothing here trusts them for more than advice:

- protection: anyone who can write the storage can delete the backup anyway;
  a sidecar that is not a plain file counts as *protected* (fails safe: prune
  keeps too much, never too little);
- verify state: decides only which backups ``verify --outdated-after`` skips,
  never whether a restore checks what it reads; a malformed state, or a time in
  the future (a forged "ok, verified in 2099"), counts as never verified;
- notes: bounded, UTF-8 only, and shown only through :func:`display_text`,
  which replaces control characters (a note cannot move the cursor, clear the
  screen or retitle the terminal of whoever lists the backups).

Pure: no I/O. The providers read and write the sidecars (with :mod:`kit.safefs`
or the store backend) and hand the bytes to the parsers here.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from pvebackup.api.errors import CorruptIndexError, UsageError

__all__ = [
    "NOTES_MAX",
    "NOTES_NAME",
    "PROTECTED_NAME",
    "SIDECAR_NAMES",
    "VERIFY_MAX",
    "VERIFY_NAME",
    "VERIFY_STATES",
    "VerifyState",
    "check_notes",
    "display_text",
    "parse_notes",
]

NOTES_NAME = "notes"
PROTECTED_NAME = "protected"
VERIFY_NAME = "verify-state.json"
SIDECAR_NAMES = frozenset({NOTES_NAME, PROTECTED_NAME, VERIFY_NAME})
"""Names no backup file may take (they would collide with a sidecar)."""

NOTES_MAX = 64 * 1024
"""Largest notes accepted, in bytes of UTF-8: a hostile sidecar is refused unread."""
VERIFY_MAX = 1024
VERIFY_STATES = ("ok", "failed")
_YEAR_10000 = 253_402_300_800  # utc_time() prints any time before it
_FUTURE_SLACK = 300  # clocks of two hosts writing one storage differ a little

# Control characters (C0 but tab and newline, DEL, C1) and the bidirectional
# overrides/isolates, which can make text display as something else.
_UNSAFE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
_UNSAFE_LINE = re.compile("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def check_notes(text: str) -> bytes:
    """Notes an operator sets, as the bytes to store.

    :raises UsageError: longer than :data:`NOTES_MAX` bytes, or with control
        characters other than newline and tab (or unencodable surrogates).
    """
    if _UNSAFE.search(text):
        raise UsageError("notes must not contain control characters (newline and tab may)")
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise UsageError("notes are not valid text") from exc
    if len(data) > NOTES_MAX:
        raise UsageError(f"notes are {len(data)} bytes, more than the {NOTES_MAX} allowed")
    return data


def parse_notes(data: bytes, where: str) -> str:
    """Stored notes as text; :class:`CorruptIndexError` naming ``where`` if malformed.

    Threat: a sidecar written by someone else; too large (the reader bounds the
    read with :data:`NOTES_MAX` too) or not UTF-8 is refused, not repaired.
    Control characters are kept: :func:`display_text` makes them harmless.
    """
    if len(data) > NOTES_MAX:
        raise CorruptIndexError(f"{where}: notes larger than {NOTES_MAX} bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CorruptIndexError(f"{where}: notes are not UTF-8 text") from exc


def display_text(text: str, *, one_line: bool = False) -> str:
    """``text`` safe to print on a terminal: control characters become U+FFFD.

    ``one_line``: only the first line, and tabs become the replacement too
    (a table cell).
    """
    if one_line:
        text = text.split("\n", 1)[0]
        return _UNSAFE_LINE.sub("\ufffd", text)
    return _UNSAFE.sub("\ufffd", text)


@dataclass(frozen=True, slots=True)
class VerifyState:
    """The result of the last verify of one backup and when it ran (Unix seconds)."""

    state: str
    time: int

    def __post_init__(self) -> None:
        if self.state not in VERIFY_STATES:
            raise ValueError(f"verify state must be one of {VERIFY_STATES}, not {self.state!r}")

    def to_bytes(self) -> bytes:
        return (json.dumps(self.to_json(), sort_keys=True) + "\n").encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> VerifyState | None:
        """The stored state, or ``None`` for anything malformed (counts as never verified).

        Threat: a forged or damaged sidecar. ``None`` only makes the next
        ``verify --outdated-after`` check the backup again.
        """
        if len(data) > VERIFY_MAX:
            return None
        try:
            doc: Any = json.loads(data)
        except (ValueError, RecursionError):
            return None
        if not isinstance(doc, dict):
            return None
        state, time = doc.get("state"), doc.get("time")
        if state not in VERIFY_STATES or type(time) is not int or not 0 <= time < _YEAR_10000:
            return None
        return cls(state, time)

    def ok_since(self, cutoff: float, now: float) -> bool:
        """Verified ``ok`` at or after ``cutoff``, and not in the future (forged)."""
        return self.state == "ok" and cutoff <= self.time <= now + _FUTURE_SLACK

    def to_json(self) -> dict[str, Any]:
        return {"state": self.state, "time": self.time}
