"""Output of the CLI: human sizes, UTC times, aligned tables; ``--output json``.

JSON output follows docs/cli-json.md (a test holds each command to it): sizes in
bytes and times in Unix seconds or ISO 8601 UTC, never a human size.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from typing import Any

from pvebackup.kit.units import format_bytes

__all__ = ["add_output_option", "human_size", "print_json", "table", "utc_time"]


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


def add_output_option(parser: argparse.ArgumentParser) -> None:
    """``--output text|json`` (default text), the same on every command."""
    parser.add_argument(
        "--output",
        choices=("text", "json"),
        default="text",
        help="output format: text for people, json for scripts (see docs/cli-json.md)",
    )


def print_json(value: Any) -> None:
    """``value`` as indented JSON on stdout, flushed (one document per command)."""
    print(json.dumps(value, indent=2, sort_keys=True), flush=True)
