"""docs/file-formats.md and store/formats.py must describe the same bytes."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pvebackup.store import formats

DOC = Path(__file__).resolve().parents[2] / "docs" / "file-formats.md"
_HEADING = re.compile(r"^##+ .*\(`([A-Z_]+)`\)\s*$")
_ROW = re.compile(r"^\|\s*(\d+)\s*\|\s*(\d+)\s*\|\s*(\w+)\s*\|")


def _doc_tables() -> dict[str, list[tuple[str, int, int]]]:
    tables: dict[str, list[tuple[str, int, int]]] = {}
    current: str | None = None
    for line in DOC.read_text().splitlines():
        m = _HEADING.match(line)
        if m:
            current = m.group(1)
            tables[current] = []
            continue
        if line.startswith("#"):
            current = None
            continue
        row = _ROW.match(line)
        if current is not None and row:
            tables[current].append((row.group(3), int(row.group(1)), int(row.group(2))))
    return tables


def _doc_magics() -> dict[str, str]:
    found = re.findall(r"\|\s*`([A-Z_]+_MAGIC)`\s*\|\s*`([0-9a-f]{16})`", DOC.read_text())
    return dict(found)


@pytest.mark.parametrize("name", sorted(formats.LAYOUTS))
def test_layout_table_matches_code(name: str) -> None:
    tables = _doc_tables()
    assert name in tables, f"docs/file-formats.md has no table for {name}"
    assert tables[name] == formats.LAYOUTS[name].offsets()


def test_every_documented_layout_exists_in_code() -> None:
    assert set(_doc_tables()) == set(formats.LAYOUTS)


def test_magics_match_docs_and_derivation() -> None:
    assert _doc_magics() == {k: v.hex() for k, v in formats.MAGICS.items()}
    assert formats.derive_magic("blob v1") == formats.BLOB_MAGIC
    assert formats.derive_magic("fixed index v1") == formats.FIXED_INDEX_MAGIC


def test_layout_sizes_add_up() -> None:
    for layout in formats.LAYOUTS.values():
        name, offset, size = layout.offsets()[-1]
        assert offset + size == layout.size == layout.struct.size


def test_table_parser_finds_every_row() -> None:
    # Guard against a parser that finds nothing and so agrees with anything.
    assert len(_doc_tables()["BLOB_HEADER"]) == len(formats.BLOB_HEADER.fields)
    assert len(_doc_tables()["FIXED_INDEX_HEADER"]) == len(formats.FIXED_INDEX_HEADER.fields)


def _doc_key_labels() -> dict[str, str]:
    found = re.findall(r'^\|\s*`([A-Z_]+)`\s*\|\s*`"([^"`]+)"`\s*\|', DOC.read_text(), re.M)
    return dict(found)


def test_key_labels_match_docs() -> None:
    # Guard against a parser that finds nothing: every label has a row.
    assert len(_doc_key_labels()) == len(formats.KEY_LABELS) >= 8
    assert _doc_key_labels() == {k: v.decode("ascii") for k, v in formats.KEY_LABELS.items()}


def test_no_key_label_is_spelled_outside_formats() -> None:
    # One place for what, if changed, makes stores unreadable (PBS keeps its formats
    # in one module): no other source file may write a label out again.
    src = Path(formats.__file__).resolve().parents[1]
    labels = list(formats.KEY_LABELS.values())
    for path in src.rglob("*.py"):
        if path.name == "formats.py" and path.parent.name == "store":
            continue
        text = path.read_bytes()
        for label in labels:
            assert label not in text, f"{path} spells out {label!r}"
