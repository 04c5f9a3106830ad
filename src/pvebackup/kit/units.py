"""Byte sizes: one parser for what people write (``4M``), one formatter for what they read.

Binary units throughout, as Proxmox VE uses them (``size=32G`` in a guest config
is 32 GiB): ``K``, ``M``, ``G``, ``T`` are powers of 1024, optionally spelt
``KiB``, ``MiB``...; a plain number, or one followed by ``B``, is bytes. Decimal
spellings (``KB``, ``MB``) are refused rather than guessed: whether ``4MB`` is
4000000 or 4194304 bytes is exactly the ambiguity a chunk size must not have.
Fractions (``1.5G``) are refused too: sizes we read are counts of bytes.
"""

from __future__ import annotations

import re

__all__ = ["SIZE_UNITS", "format_bytes", "parse_size"]

SIZE_UNITS: dict[str, int] = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
"""Multiplier of each unit letter :func:`parse_size` accepts."""

# At most 19 digits: anything longer is no size of ours, and the bound keeps a
# hostile or mistyped value from reaching Python's slow huge-int conversion.
_SIZE = re.compile(r"([0-9]{1,19})\s*(?:([KMGT])(?:iB)?|B)?", re.IGNORECASE)
_FORMAT_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def parse_size(text: str) -> int:
    """``"4M"`` -> ``4194304``; ``"512"`` and ``"512B"`` -> ``512``; ``"1GiB"`` -> 2**30.

    Units are case-insensitive (``4m`` is ``4M``).

    :raises ValueError: anything else; the message says what is accepted.
    """
    m = _SIZE.fullmatch(text.strip())
    if m is None:
        raise ValueError(
            f"{text[:40]!r} is no size: write bytes, or a number with K, M, G or T "
            "(binary units, e.g. 4M or 4MiB)"
        )
    return int(m.group(1)) * SIZE_UNITS[(m.group(2) or "").upper()]


def format_bytes(size: float) -> str:
    """``1536`` -> ``"1.5 KiB"``; below 1 KiB whole bytes (``"512 B"``).

    Binary units with one decimal, the largest unit that keeps the number
    below 1024 (up to PiB). Negative sizes keep their sign.
    """
    value = abs(float(size))
    sign = "-" if size < 0 else ""
    for unit in _FORMAT_UNITS:
        # compare the rounded value, so that 1048575 reads "1.0 MiB", not "1024.0 KiB"
        shown = int(value) if unit == "B" else round(value, 1)
        if shown < 1024 or unit == _FORMAT_UNITS[-1]:
            if unit == "B":
                return f"{sign}{int(value)} B"
            return f"{sign}{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")
