"""kit.units: the one size parser and the one size formatter."""

from __future__ import annotations

import pytest

from pvebackup.kit.units import format_bytes, parse_size


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("0", 0),
        ("512", 512),
        ("512B", 512),
        ("64K", 64 << 10),
        ("64k", 64 << 10),
        ("4M", 4 << 20),
        ("4MiB", 4 << 20),
        ("4 M", 4 << 20),
        ("1G", 1 << 30),
        ("2T", 2 << 40),
        (" 1g ", 1 << 30),
    ],
)
def test_parse_size_binary_units(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize(
    "text",
    ["", "M", "4MB", "4KB", "1.5G", "-1", "0x10", "4 MiBs", "1P", "4M4", "1_000", "١٢",
     "9" * 20, "9" * 5000],
)  # fmt: skip
def test_parse_size_refuses_what_it_would_have_to_guess(text: str) -> None:
    # 4MB: decimal or binary? 1.5G: fractions of bytes; "١٢": int() would take
    # Arabic-Indic digits; 5000 digits: no size, and int() of it is slow or refused.
    with pytest.raises(ValueError, match="no size"):
        parse_size(text)


@pytest.mark.parametrize(
    ("size", "text"),
    [
        (0, "0 B"),
        (1023, "1023 B"),
        (1024, "1.0 KiB"),
        (1536, "1.5 KiB"),
        ((1 << 20) - 1, "1.0 MiB"),  # rounded up: never "1024.0 KiB"
        (3 << 29, "1.5 GiB"),
        (5 << 40, "5.0 TiB"),
        (1 << 60, "1024.0 PiB"),
        (-1536, "-1.5 KiB"),
        (2.5 * 1024 * 1024, "2.5 MiB"),
    ],
)
def test_format_bytes(size: float, text: str) -> None:
    assert format_bytes(size) == text


def test_format_then_parse_agree_on_units() -> None:
    for unit, letter in (("KiB", "K"), ("MiB", "M"), ("GiB", "G"), ("TiB", "T")):
        size = parse_size(f"3{letter}")
        assert format_bytes(size) == f"3.0 {unit}"
        assert parse_size(f"3{unit}") == size
