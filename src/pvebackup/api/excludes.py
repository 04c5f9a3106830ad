"""rsync-style exclude patterns, as vzdump's ``--exclude-path`` hands them over.

``backup_directory`` gets ``exclude_paths``: glob patterns with the meaning of
rsync's ``--exclude`` when the transfer root is the container's root directory.
:class:`ExcludeMatcher` decides for one path at a time whether it is excluded.
The rules (rsync(1), "PATTERN MATCHING RULES"; the tests compare with real rsync):

- ``*`` matches zero or more characters except ``/``; ``**`` (or more stars) matches
  anything including ``/``; ``?`` one character except ``/``; ``[...]`` one
  character of a class (``[!...]``/``[^...]`` negate, ``[[:alpha:]]`` named
  classes); a class never matches ``/``. A backslash escapes the next character,
  but only in a pattern that has a wildcard (``*?[``); otherwise it is literal.
- A trailing ``/`` makes the pattern match directories only.
- A leading ``/`` anchors the pattern at the container root: it must match the
  whole relative path (``/var/log`` matches ``var/log``, not ``srv/var/log``).
- Without a (non-trailing) ``/`` and without ``**`` a pattern matches the last
  path component only, at any depth (``*.log``).
- With an inner ``/`` (and no ``**``) a pattern matches the last N+1 components,
  N being its number of slashes (``home/*/secret`` matches ``x/home/u/secret``).
- With ``**`` (not anchored, not starting with ``**``) a pattern is tried at every
  component boundary; one starting with ``**`` must match from the start of the
  path. A leading ``**/`` may match zero directories (``**/cache`` matches
  ``var/cache`` and a top-level ``cache``), an inner or anchored ``/**/`` may not:
  ``/a/**/z`` and ``a/**/z`` do not match ``a/z``.
- ``dir/***`` matches the directory ``dir`` and everything below it.

rsync never descends into an excluded directory, so everything below it is
excluded as well. :meth:`ExcludeMatcher.excluded` looks at one path only: a
provider walking the tree calls it for every entry and does not descend into a
directory for which it returns ``True``. :meth:`ExcludeMatcher.excluded_with_parents`
also checks every parent directory, for callers that see paths out of walk order.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["ExcludeMatcher"]

_NAMED_CLASSES = {
    "alnum": "a-zA-Z0-9",
    "alpha": "a-zA-Z",
    "blank": " \\t",
    "cntrl": "\\x00-\\x1f\\x7f",
    "digit": "0-9",
    "graph": "\\x21-\\x7e",
    "lower": "a-z",
    "print": "\\x20-\\x7e",
    "punct": "!-/:-@\\[-`{-~",
    "space": " \\t\\n\\r\\f\\v",
    "upper": "A-Z",
    "xdigit": "0-9A-Fa-f",
}

_NEVER = "(?!)"


def _class_to_regex(pattern: str, start: int) -> tuple[str, int]:
    """Translate the class starting after ``[`` at ``start``; return (regex, next index).

    Returns ``_NEVER`` and the pattern's length for an unterminated class: rsync's
    wildmatch then fails the whole match.
    """
    i = start
    negate = False
    if i < len(pattern) and pattern[i] in "!^":
        negate = True
        i += 1
    items: list[str] = []
    first = True
    while i < len(pattern):
        ch = pattern[i]
        if ch == "]" and not first:
            body = "".join(items)
            if negate:
                return f"[^/{body}]", i + 1
            return (f"(?!/)[{body}]" if body else _NEVER), i + 1
        first = False
        if ch == "[" and pattern.startswith("[:", i):
            end = pattern.find(":]", i + 2)
            if end >= 0:
                name = pattern[i + 2 : end]
                if name not in _NAMED_CLASSES:
                    return _NEVER, len(pattern)
                items.append(_NAMED_CLASSES[name])
                i = end + 2
                continue
        if ch == "\\" and i + 1 < len(pattern):
            i += 1
            ch = pattern[i]
        lo = ch
        if i + 2 < len(pattern) and pattern[i + 1] == "-" and pattern[i + 2] != "]":
            hi = pattern[i + 2]
            i += 2
            if hi == "\\" and i + 1 < len(pattern):
                i += 1
                hi = pattern[i]
            if hi < lo:
                # rsync's wildmatch still matches the range's first character.
                items.append(re.escape(lo))
            else:
                items.append(f"{re.escape(lo)}-{re.escape(hi)}")
        else:
            items.append(re.escape(lo))
        i += 1
    return _NEVER, len(pattern)


def _wild_to_regex(pattern: str) -> str:
    """Translate an rsync wildcard pattern to a Python regex (without anchors)."""
    out: list[str] = []
    i = 0
    while i < len(pattern):
        ch = pattern[i]
        if ch == "*":
            j = i
            while j < len(pattern) and pattern[j] == "*":
                j += 1
            out.append(".*" if j - i >= 2 else "[^/]*")
            i = j
        elif ch == "?":
            out.append("[^/]")
            i += 1
        elif ch == "[":
            regex, i = _class_to_regex(pattern, i + 1)
            out.append(regex)
        elif ch == "\\" and i + 1 < len(pattern):
            out.append(re.escape(pattern[i + 1]))
            i += 2
        else:
            out.append(re.escape(ch))
            i += 1
    return "".join(out)


@dataclass(frozen=True, slots=True)
class _Rule:
    pattern: str
    regex: re.Pattern[str]
    dir_only: bool
    basename_only: bool
    # "dir/***": also matches the directory "dir" itself (directories only).
    self_regex: re.Pattern[str] | None


def _compile(pattern: str) -> _Rule | None:
    raw = pattern
    if not raw or raw == "/":
        return None
    dir_only = False
    if len(raw) > 1 and raw.endswith("/"):
        raw = raw[:-1]
        dir_only = True
    anchored = raw.startswith("/")
    if anchored:
        raw = raw[1:]
    self_pattern: str | None = None
    if raw.endswith("/***") and len(raw) > 4:
        self_pattern = raw[:-4]
    wild = any(c in raw for c in "*?[")
    has_starstar = "**" in raw
    slashes = raw.count("/") + (1 if anchored else 0)

    def translate(text: str) -> str:
        return _wild_to_regex(text) if wild else re.escape(text)

    leading = re.match(r"\*{2,}/", raw) if wild and not anchored else None
    if leading is not None:
        # rsync lets a leading "**/" match zero directories as well ("**/cache"
        # matches a top-level "cache"); an inner "/**/" or an anchored one does not.
        raw = raw[leading.end() :]
        if self_pattern is not None:
            self_pattern = self_pattern[leading.end() :]
    if not slashes and not has_starstar:
        prefix = ""
        basename_only = True
    elif leading is not None:
        prefix = "(?:.*/)?"
        basename_only = False
    elif anchored or raw.startswith("**"):
        prefix = ""
        basename_only = False
    else:
        # Match at the end of the path, starting at a component boundary: for a
        # pattern with N slashes and no "**" that is exactly the last N+1 components.
        prefix = "(?:.*/)?"
        basename_only = False
    regex = re.compile(prefix + translate(raw), re.DOTALL)
    self_regex = None
    if self_pattern is not None:
        self_regex = re.compile(prefix + translate(self_pattern), re.DOTALL)
    return _Rule(pattern, regex, dir_only, basename_only, self_regex)


def _normalize(relpath: str) -> str:
    path = relpath
    while path.startswith("./"):
        path = path[2:]
    path = path.strip("/")
    return "" if path == "." else path


class ExcludeMatcher:
    """Decide whether a path of the container is excluded by rsync-style patterns.

    ``patterns`` are compiled once to regular expressions; empty patterns are
    ignored. An empty matcher excludes nothing.
    """

    def __init__(self, patterns: Sequence[str]) -> None:
        self.patterns: tuple[str, ...] = tuple(patterns)
        self._rules = [rule for p in self.patterns if (rule := _compile(p)) is not None]

    def __bool__(self) -> bool:
        return bool(self._rules)

    def __repr__(self) -> str:
        return f"ExcludeMatcher({list(self.patterns)!r})"

    def excluded(self, relpath: str, is_dir: bool) -> bool:
        """Whether ``relpath`` itself matches an exclude pattern.

        ``relpath`` is relative to the container root (``"var/log/syslog"``; a
        leading ``./`` or ``/`` and a trailing ``/`` are ignored); ``""`` and
        ``"."`` are the root, which is never excluded. ``is_dir`` says whether the
        path is a directory (a symlink to a directory is not one). Parents are
        not looked at: when this returns ``True`` for a directory, skip its whole
        subtree, as rsync does.
        """
        path = _normalize(relpath)
        if not path:
            return False
        name = path.rsplit("/", 1)[-1]
        for rule in self._rules:
            if rule.dir_only and not is_dir:
                continue
            text = name if rule.basename_only else path
            if rule.regex.fullmatch(text):
                return True
            if is_dir and rule.self_regex is not None and rule.self_regex.fullmatch(text):
                return True
        return False

    def excluded_with_parents(self, relpath: str, is_dir: bool) -> bool:
        """Whether ``relpath`` or any directory above it is excluded."""
        path = _normalize(relpath)
        if not path:
            return False
        parts = path.split("/")
        for i in range(1, len(parts)):
            if self.excluded("/".join(parts[:i]), True):
                return True
        return self.excluded(path, is_dir)
