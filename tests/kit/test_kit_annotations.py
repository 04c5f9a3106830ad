"""Sidecar parsing: hostile notes and verify states are refused or neutralised."""

from __future__ import annotations

import pytest

from pvebackup.api.errors import CorruptIndexError, UsageError
from pvebackup.kit.annotations import (
    NOTES_MAX,
    VerifyState,
    check_notes,
    display_text,
    parse_notes,
)


def test_display_text_replaces_terminal_escapes_and_bidi_overrides() -> None:
    hostile = "ok\x1b]0;owned\x07\x1b[2J\x9b31m\u202eevil\ttab\nline2\x7f"
    shown = display_text(hostile)
    assert not any(c in shown for c in "\x1b\x07\x9b\u202e\x7f")
    assert shown.startswith("ok\ufffd]0;owned") and "\ttab\nline2" in shown
    one = display_text(hostile, one_line=True)
    assert "\n" not in one and "\t" not in one and "line2" not in one


def test_check_notes_refuses_control_characters_and_oversize() -> None:
    assert check_notes("a\tb\nc ünï") == "a\tb\nc ünï".encode()
    for bad in ("\x1b[31mred", "nul\x00", "cr\r", "\x85"):
        with pytest.raises(UsageError, match="control characters"):
            check_notes(bad)
    with pytest.raises(UsageError, match="more than"):
        check_notes("é" * (NOTES_MAX // 2 + 1))
    with pytest.raises(UsageError):
        check_notes("\ud800")  # a lone surrogate cannot be stored as UTF-8


def test_parse_notes_refuses_binary_and_oversize() -> None:
    assert parse_notes("hé\n".encode(), "x") == "hé\n"
    with pytest.raises(CorruptIndexError, match="not UTF-8"):
        parse_notes(b"\xff\xfe\x00binary", "x")
    with pytest.raises(CorruptIndexError, match="larger"):
        parse_notes(b"a" * (NOTES_MAX + 1), "x")


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"not json",
        b"[1]",
        b'{"state": "ok"}',
        b'{"state": "ok", "time": "1700000000"}',
        b'{"state": "ok", "time": true}',
        b'{"state": "ok", "time": 1.5}',
        b'{"state": "ok", "time": -1}',
        b'{"state": "ok", "time": 99999999999999999999}',
        b'{"state": "great", "time": 1}',
        b"[" * 100_000,
        b'{"state": "ok", "time": 1, "pad": "' + b"x" * 2000 + b'"}',
    ],
)
def test_malformed_verify_state_counts_as_never_verified(data: bytes) -> None:
    assert VerifyState.from_bytes(data) is None


def test_verify_state_roundtrip_and_forged_future_is_outdated() -> None:
    state = VerifyState("ok", 1_700_000_000)
    assert VerifyState.from_bytes(state.to_bytes()) == state
    now = 1_700_000_100.0
    assert state.ok_since(now - 86400, now)
    assert not state.ok_since(now - 50, now)  # older than the cutoff
    assert not VerifyState("failed", 1_700_000_000).ok_since(now - 86400, now)
    forged = VerifyState("ok", 4_000_000_000)  # "verified in 2096"
    assert not forged.ok_since(now - 86400, now)
    with pytest.raises(ValueError):
        VerifyState("skipped", 1)
