"""Shared strategies and checks of the fuzz tests of storage-content parsers.

The property every parser of storage content must have (issue 8): for any input,
success or a typed :class:`PveBackupError`, never another exception, bounded
memory. Inputs come two ways: raw bytes (anything at all), and structured
mutation (a valid document with one field replaced by a hostile value, deleted,
or the whole document cut or nested), which reaches the checks behind the
syntax that raw bytes rarely get past.
"""

from __future__ import annotations

import json
import math
import tracemalloc
from collections.abc import Callable
from typing import Any, TypeVar

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from pvebackup.api.errors import PveBackupError

__all__ = [
    "FUZZ",
    "HOSTILE_VALUES",
    "hostile_json_bytes",
    "mutated",
    "peak_memory",
    "typed_or_ok",
]

T = TypeVar("T")

FUZZ = settings(
    # Twice the profile's examples: 200 in CI (tests/conftest.py), more when exploring.
    max_examples=2 * settings.default.max_examples,
    deadline=None,  # file system work: timing varies with the machine's load
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
"""Settings of every fuzz test of a storage-content parser."""

# Values a writer of the storage may put where a reader expects something else.
HOSTILE_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.sampled_from([-1, 0, 2**63 - 1, 2**63, 2**64, 10**400, -(10**400)]),
    st.sampled_from([math.nan, math.inf, -math.inf, 1e308, -0.0, 0.5]),
    st.text(max_size=40),
    st.sampled_from(
        ["", "../../etc/passwd", "/etc/shadow", "a/b", "x" * 5000, "\x00", "\udcff", "é"]
    ),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=3),
)


def _paths(doc: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path to a value inside nested dicts and lists (the root too)."""
    out = [prefix]
    if isinstance(doc, dict):
        for k, v in doc.items():
            out.extend(_paths(v, (*prefix, k)))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out.extend(_paths(v, (*prefix, i)))
    return out


def _replace(doc: Any, path: tuple[Any, ...], value: Any, delete: bool) -> Any:
    if not path:
        return value
    head, rest = path[0], path[1:]
    if isinstance(doc, dict):
        new = dict(doc)
        if delete and not rest:
            del new[head]
        else:
            new[head] = _replace(doc[head], rest, value, delete)
        return new
    new_list = list(doc)
    if delete and not rest:
        del new_list[head]
    else:
        new_list[head] = _replace(doc[head], rest, value, delete)
    return new_list


@st.composite
def mutated(draw: st.DrawFn, doc: Any) -> Any:
    """``doc`` with one value replaced by a hostile one, or one key deleted."""
    paths = _paths(doc)
    path = draw(st.sampled_from(paths))
    delete = bool(path) and draw(st.booleans())
    return _replace(doc, path, draw(HOSTILE_VALUES), delete)


def _dumps(doc: Any) -> bytes:
    # allow_nan: a hostile writer is not bound by the JSON standard either.
    return json.dumps(doc, sort_keys=True).encode("utf-8", "surrogatepass")


@st.composite
def hostile_json_bytes(draw: st.DrawFn, doc: Any) -> bytes:
    """Bytes of a JSON document made from ``doc`` by one hostile change."""
    valid = _dumps(doc)
    how = draw(st.sampled_from(["mutate", "mutate", "mutate", "cut", "flip", "raw", "nest"]))
    if how == "mutate":
        return _dumps(draw(mutated(doc)))
    if how == "cut":
        return valid[: draw(st.integers(0, len(valid)))]
    if how == "flip":
        data = bytearray(valid)
        i = draw(st.integers(0, len(data) - 1))
        data[i] = draw(st.integers(0, 255))
        return bytes(data)
    if how == "nest":  # a nesting bomb: json.loads raises RecursionError on it
        depth = draw(st.sampled_from([100, 10_000, 200_000]))
        return b"[" * depth + b"]" * depth
    return draw(st.binary(max_size=300))


def typed_or_ok(fn: Callable[[], T]) -> T | PveBackupError:
    """Run ``fn``: its result, or the ``PveBackupError`` it raised; anything else
    propagates and fails the test (that is the property)."""
    try:
        return fn()
    except PveBackupError as exc:
        return exc


def peak_memory(fn: Callable[[], object]) -> int:
    """Peak bytes allocated through Python while ``fn`` runs (its exception is
    swallowed only when it is a ``PveBackupError``)."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        typed_or_ok(fn)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
