"""ExcludeMatcher: edge cases, and agreement with real rsync on a fixture tree."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from pvebackup.api.excludes import ExcludeMatcher

FILES = [
    "var/log/syslog",
    "var/log/app.log",
    "var/log/old/x.log",
    "var/cache/apt/pkg.bin",
    "var/lib/cache",
    "cache/top",
    "srv/cache",
    "srv/data/x.tmp",
    "srv/data/keep",
    "srv/data/sub/y.tmp",
    "tmp/a",
    "tmp/sub/b",
    "home/u1/secret",
    "home/u1/x/secret",
    "home/u2/secret/inner",
    "secret",
    "a.txt",
    "b.txt",
    "ab.txt",
    "1.txt",
    "Z.txt",
    "sub/dir",
    "dir/inner",
    "a/z",
    "a/b/z",
    "a/b/c/z",
    "b/z",
    "axb/in",
    "x/ayb/in",
    "ab",
    "odd/with space",
    "odd/br[a]ck",
    "odd/q?mark",
    "x/cache/f",
    "y/x/cache/g",
]
DIRS = ["emptydir", "deep/er/dir"]
SYMLINKS = {"link": "var", "odd/dirlink": "../dir"}

PATTERNS = [
    "*.log",
    "/var/log",
    "var/cache/",
    "tmp/*",
    "**/cache",
    "home/*/secret",
    "?.txt",
    "[ab]*",
    "dir/",
    "/a/**/z",
    "/srv/data/*.tmp",
    "a*b/",
    "cache",
    "/cache/",
    "log/syslog",
    "srv/**",
    "**",
    "*",
    "[!a-m]*.txt",
    "[[:digit:]].txt",
    "[[:upper:]]*",
    "/home/***",
    "data/***",
    "link/",
    "link",
    "b/z",
    "a/**/z",
    "**/z",
    "*/",
    "var/",
    "/odd/br\\[a\\]ck",
    "br[a]ck",
    "q?mark",
    "with space",
    "/deep/er",
    "er/dir/",
    "*dir*",
    "/",
    "[]a]*",
    "[z-a]*",
    "/**/cache",
    "x/**/cache",
    "**/a/z",
    "***/cache",
    "**cache",
    "**/",
    "/x**",
    "/srv/**/*.tmp",
]


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("excl") / "src"
    for rel in FILES:
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(rel)
    for rel in DIRS:
        (root / rel).mkdir(parents=True, exist_ok=True)
    for rel, target in SYMLINKS.items():
        (root / rel).symlink_to(target)
    return root


def walk_with_matcher(root: Path, matcher: ExcludeMatcher) -> set[str]:
    """What a provider walking the tree keeps: excluded directories are not entered."""
    kept: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root):
        reldir = os.path.relpath(dirpath, root)
        prefix = "" if reldir == "." else reldir + "/"
        for name in list(dirnames):
            rel = prefix + name
            is_dir = not os.path.islink(os.path.join(dirpath, name))
            if matcher.excluded(rel, is_dir):
                dirnames.remove(name)
            else:
                kept.add(rel)
        for name in filenames:
            rel = prefix + name
            if not matcher.excluded(rel, False):
                kept.add(rel)
    return kept


def rsync_copy(src: Path, dst: Path, pattern: str) -> set[str]:
    subprocess.run(
        ["rsync", "-a", f"--exclude={pattern}", f"{src}/", f"{dst}/"],
        check=True,
        capture_output=True,
    )
    found: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(dst):
        reldir = os.path.relpath(dirpath, dst)
        prefix = "" if reldir == "." else reldir + "/"
        found.update(prefix + n for n in dirnames + filenames)
    return found


@pytest.mark.e2e
@pytest.mark.parametrize("pattern", PATTERNS)
def test_matches_real_rsync(tree: Path, tmp_path: Path, pattern: str) -> None:
    expected = rsync_copy(tree, tmp_path / "dst", pattern)
    assert walk_with_matcher(tree, ExcludeMatcher([pattern])) == expected


@pytest.mark.e2e
def test_several_patterns_match_real_rsync(tree: Path, tmp_path: Path) -> None:
    patterns = ["*.log", "/srv/data/*.tmp", "home/*/secret", "tmp/"]
    args = [f"--exclude={p}" for p in patterns]
    dst = tmp_path / "dst"
    subprocess.run(["rsync", "-a", *args, f"{tree}/", f"{dst}/"], check=True)
    expected = {str(p.relative_to(dst)) for p in dst.rglob("*")}
    assert walk_with_matcher(tree, ExcludeMatcher(patterns)) == expected


@pytest.mark.parametrize("root", ["", ".", "./", "/"])
def test_root_is_never_excluded(root: str) -> None:
    assert not ExcludeMatcher(["**", "*", "./", "/."]).excluded(root, True)


def test_leading_dot_slash_and_slash_are_ignored() -> None:
    m = ExcludeMatcher(["/var/log"])
    assert m.excluded("./var/log", True)
    assert m.excluded("/var/log", True)
    assert m.excluded("var/log/", True)
    assert not m.excluded("srv/var/log", True)


def test_trailing_slash_matches_directories_only() -> None:
    m = ExcludeMatcher(["cache/"])
    assert m.excluded("var/cache", True)
    assert not m.excluded("var/cache", False)


def test_basename_pattern_matches_at_any_depth() -> None:
    m = ExcludeMatcher(["*.log"])
    assert m.excluded("a.log", False)
    assert m.excluded("var/log/a.log", False)
    assert not m.excluded("var/a.log/x", False)


def test_inner_slash_matches_trailing_components() -> None:
    m = ExcludeMatcher(["home/*/secret"])
    assert m.excluded("home/u/secret", False)
    assert m.excluded("x/home/u/secret", False)
    assert not m.excluded("home/u/v/secret", False)
    assert not m.excluded("xhome/u/secret", False)


def test_leading_double_star_slash_matches_zero_directories() -> None:
    m = ExcludeMatcher(["**/cache"])
    assert m.excluded("var/cache", True)
    assert m.excluded("a/b/cache", True)
    assert m.excluded("cache", True)
    assert not m.excluded("xcache", True)
    assert not ExcludeMatcher(["/**/cache"]).excluded("cache", True)
    assert ExcludeMatcher(["/**/cache"]).excluded("x/cache", True)


def test_double_star_does_not_collapse() -> None:
    m = ExcludeMatcher(["/a/**/z"])
    assert m.excluded("a/b/z", False)
    assert m.excluded("a/b/c/z", False)
    assert not m.excluded("a/z", False)


def test_triple_star_suffix_matches_directory_and_contents() -> None:
    m = ExcludeMatcher(["/home/***"])
    assert m.excluded("home", True)
    assert not m.excluded("home", False)
    assert m.excluded("home/u/f", False)


def test_character_classes() -> None:
    m = ExcludeMatcher(["[!a-c]x", "[[:digit:]]y", "[]]z"])
    assert m.excluded("dx", False)
    assert not m.excluded("bx", False)
    assert m.excluded("7y", False)
    assert not m.excluded("ay", False)
    assert m.excluded("]z", False)
    # A class never matches a slash, not even a negated one.
    assert not ExcludeMatcher(["/a[!x]b"]).excluded("a/b", False)


def test_unterminated_class_never_matches() -> None:
    assert not ExcludeMatcher(["[abc"]).excluded("[abc", False)


def test_backslash_is_literal_without_wildcards() -> None:
    assert ExcludeMatcher(["foo\\bar"]).excluded("foo\\bar", False)
    assert ExcludeMatcher(["foo\\*"]).excluded("foo*", False)
    assert not ExcludeMatcher(["foo\\*"]).excluded("foox", False)


def test_question_mark_is_one_non_slash_char() -> None:
    m = ExcludeMatcher(["/a?b"])
    assert m.excluded("axb", False)
    assert not m.excluded("a/b", False)
    assert not m.excluded("ab", False)


def test_empty_matcher_excludes_nothing() -> None:
    m = ExcludeMatcher(["", "/"])
    assert not m
    assert not m.excluded("anything", False)
    assert ExcludeMatcher(["x"])


def test_excluded_with_parents() -> None:
    m = ExcludeMatcher(["/var/cache/"])
    assert m.excluded_with_parents("var/cache/apt/x", False)
    assert not m.excluded("var/cache/apt/x", False)
    assert not m.excluded_with_parents("var/lib/x", False)
    assert not m.excluded_with_parents(".", True)
