"""Plain-text output of the CLI: human sizes, UTC times, aligned tables."""

from __future__ import annotations

import time
from collections.abc import Sequence

from pvebackup.kit.units import format_bytes

__all__ = ["human_size", "table", "utc_time"]


def human_size(size: int | None) -> str:
    """``1536`` -> ``1.5 KiB``; ``None`` -> ``-``."""
    return "-" if size is None else format_bytes(size)


def utc_time(seconds: int) -> str:
    """Unix seconds as ISO 8601 in UTC: ``2024-07-23T09:56:11Z``."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns separated by two spaces; the last column is not padded."""
    all_rows = [list(header), *[list(r) for r in rows]]
    widths = [max(len(r[i]) for r in all_rows) for i in range(len(header))]
    lines = []
    for row in all_rows:
        cells = [c.ljust(w) for c, w in zip(row[:-1], widths[:-1], strict=True)]
        lines.append("  ".join([*cells, row[-1]]).rstrip())
    return "\n".join(lines)
