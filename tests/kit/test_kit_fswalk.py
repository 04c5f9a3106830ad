"""Walking container sources: excludes, mount point sources, order."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pvebackup.api.errors import UsageError
from pvebackup.kit.fswalk import SourceWalker, normalize_source


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    for rel in ["a/x", "a/y.log", "cache/big/f", "srv/data/db", "srv/other", "z"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(rel)
    return tmp_path


def names(walker: SourceWalker) -> list[str]:
    return [entry.archive_name for entry in walker]


def test_depth_first_sorted_with_nested_source_in_place(tree: Path) -> None:
    walker = SourceWalker(str(tree), ["./srv/data", "."], [])
    assert names(walker) == [
        ".",
        "./a",
        "./a/x",
        "./a/y.log",
        "./cache",
        "./cache/big",
        "./cache/big/f",
        "./srv",
        "./srv/data",
        "./srv/data/db",
        "./srv/other",
        "./z",
    ]


def test_excluded_directories_are_not_descended(
    tree: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    listed: list[str] = []
    real_scandir = os.scandir

    def scandir(path: str) -> os.ScandirIterator[str]:
        listed.append(os.path.relpath(path, tree))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    walker = SourceWalker(str(tree), ["."], ["/cache/", "*.log"])
    assert names(walker) == [
        ".",
        "./a",
        "./a/x",
        "./srv",
        "./srv/data",
        "./srv/data/db",
        "./srv/other",
        "./z",
    ]
    assert walker.excluded == 2
    assert not any(path.startswith("cache") for path in listed)


def test_source_roots_are_never_excluded(tree: Path) -> None:
    walker = SourceWalker(str(tree), [".", "./srv/data"], ["srv/", "data"])
    result = names(walker)
    assert result[0] == "."
    # srv is excluded in the root walk, its mount point source is still stored.
    assert "./srv" not in result
    assert result[-2:] == ["./srv/data", "./srv/data/db"]


def test_normalize_source() -> None:
    assert normalize_source(".") == ""
    assert normalize_source("./srv/data/") == "srv/data"
    assert normalize_source("/srv//data") == "srv/data"
    with pytest.raises(UsageError):
        normalize_source("./../etc")


def test_missing_directory_is_a_typed_not_found_error(tmp_path: Path) -> None:
    # The container's directory vanished (or never was): our error, naming it.
    from pvebackup.api.errors import NotFoundError

    gone = tmp_path / "gone"
    with pytest.raises(NotFoundError, match="gone"):
        list(SourceWalker(str(gone), ["."], []))
