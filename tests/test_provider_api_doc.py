"""docs/provider-api.md agrees with the code: snippets, enum names, documented fields.

Every code block of the guide is a snippet of ``examples/plainfiles`` (or of the
example's contract test), marked ``<!-- snippet: PATH NAME -->`` and identical to
the region between ``# [snippet:NAME]`` and ``# [end]`` of PATH, so the guide never
shows code the example does not run.
"""

from __future__ import annotations

import dataclasses
import re
import textwrap
from pathlib import Path

import pvebackup.api as api
from pvebackup.storage import PropertySpec, VolumeInfo
from pvebackup.testing import Capability, ProviderContract

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs/provider-api.md"

_BLOCK = re.compile(r"^```(\w+)\n(.*?)^```\n", re.MULTILINE | re.DOTALL)
_MARK = re.compile(r"<!-- snippet: (\S+) (\S+) -->\n```\w+\n(.*?)^```\n", re.M | re.S)


def doc_snippets(text: str) -> list[tuple[str, str, str]]:
    """(path, name, code) of every marked block."""
    return [(m.group(1), m.group(2), m.group(3)) for m in _MARK.finditer(text)]


def source_region(path: Path, name: str) -> str:
    lines = path.read_text().splitlines(keepends=True)
    starts = [i for i, line in enumerate(lines) if line.strip() == f"# [snippet:{name}]"]
    assert len(starts) == 1, f"{path}: region {name} found {len(starts)} times"
    end = next(i for i in range(starts[0], len(lines)) if lines[i].strip() == "# [end]")
    return textwrap.dedent("".join(lines[starts[0] + 1 : end]))


def source_regions(path: Path) -> set[str]:
    return set(re.findall(r"^\s*# \[snippet:(\w+)\]$", path.read_text(), re.M))


def test_every_code_block_is_a_marked_snippet() -> None:
    text = DOC.read_text()
    blocks = [m for m in _BLOCK.finditer(text) if m.group(1) in ("python", "toml")]
    assert blocks
    assert len(blocks) == len(doc_snippets(text)), "an unmarked python/toml block"


def test_snippets_are_byte_identical_to_the_example() -> None:
    snippets = doc_snippets(DOC.read_text())
    assert len(snippets) >= 8
    for path, name, code in snippets:
        assert code == source_region(ROOT / path, name), f"{path} {name} differs"


def test_every_example_region_is_shown() -> None:
    shown = {(path, name) for path, name, _ in doc_snippets(DOC.read_text())}
    for path in {p for p, _ in shown}:
        for name in source_regions(ROOT / path):
            assert (path, name) in shown, f"{path} region {name} is not in the guide"


def test_checker_catches_a_drift(tmp_path: Path) -> None:
    src = tmp_path / "m.py"
    src.write_text("x = 1\n    # [snippet:a]\n    def f():\n        return 1\n    # [end]\n")
    assert source_region(src, "a") == "def f():\n    return 1\n"
    doc = "<!-- snippet: m.py a -->\n```python\ndef f():\n    return 2\n```\n"
    ((_, _, code),) = doc_snippets(doc)
    assert code != source_region(src, "a")


_ENUM_ROW = re.compile(
    r"`(GuestType|BackupMechanism|RestoreMechanism|BitmapMode|LogLevel)` \| "
    r"((?:`\w+` \(`[\w-]+`\)(?:, )?)+)"
)


def test_enum_table_matches_the_enums() -> None:
    rows = _ENUM_ROW.findall(DOC.read_text())
    assert len(rows) == 5
    for enum_name, members in rows:
        enum = getattr(api, enum_name)
        documented = dict(re.findall(r"`(\w+)` \(`([\w-]+)`\)", members))
        assert documented == {m.name: m.value for m in enum}, enum_name


def _table_fields(heading: str) -> list[str]:
    """The field names in the first column of the table after ``heading``."""
    text = DOC.read_text()
    match = re.search(r"(^\|.*\n)+", text[text.index(heading) :], re.M)
    assert match is not None, heading
    table = match.group(0)
    rows = re.findall(r"^\| ((?:`\w+`(?:, )?)+) \|", table, re.M)
    return [name for row in rows for name in re.findall(r"`(\w+)`", row)]


def test_volume_info_and_property_spec_fields_are_documented() -> None:
    assert _table_fields("**`VolumeInfo`**") == [f.name for f in dataclasses.fields(VolumeInfo)]
    assert sorted(_table_fields("### Storage properties (`PropertySpec`)")) == sorted(
        f.name for f in dataclasses.fields(PropertySpec)
    )


def test_every_contract_test_is_in_the_guide() -> None:
    """A newcomer finds each test (named after its seed method) in the guide's table."""
    tests = {name for name in dir(ProviderContract) if name.startswith("test_")}
    documented = set(re.findall(r"`(test_\w+)`", DOC.read_text()))
    assert tests == documented


def test_capabilities_are_documented() -> None:
    text = DOC.read_text()
    for cap in Capability:
        assert f"`{cap.name}`" in text, cap
