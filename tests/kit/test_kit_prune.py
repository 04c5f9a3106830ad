"""kit.prune: Proxmox's retention marking, against the shared upstream vectors."""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from pvebackup.kit.prune import (
    KeepOptions,
    Mark,
    PruneCandidate,
    format_keep_options,
    mark_prune,
    parse_keep_options,
)

_VECTORS = Path(__file__).resolve().parents[2].parent / "shared" / "prune" / "vectors.json"


def _load_vectors() -> list[dict[str, Any]]:
    if not _VECTORS.is_file():
        return []
    data: dict[str, Any] = json.loads(_VECTORS.read_text())
    vectors: list[dict[str, Any]] = data["vectors"]
    return vectors


def _options(raw: dict[str, Any]) -> KeepOptions:
    return KeepOptions(
        keep_all=bool(raw.get("keep-all", False)),
        **{k.removeprefix("keep-"): int(v) for k, v in raw.items() if k != "keep-all"},
    )


_LOADED = _load_vectors()


@pytest.mark.skipif(not _LOADED, reason=f"prune vectors absent ({_VECTORS}); shared dir missing")
@pytest.mark.parametrize("vector", _LOADED, ids=[str(i) for i in range(len(_LOADED))])
def test_prune_matches_upstream_vector(vector: dict[str, Any]) -> None:
    backups = [
        PruneCandidate(b["ctime"], b["ctime"], bool(b["protected"])) for b in vector["backups"]
    ]
    marks = mark_prune(
        backups,
        _options(vector["options"]),
        ZoneInfo(vector["timezone"]),
        keep_all_fallback=vector["keep_all_fallback"],
    )
    got = {m: sorted(k for k, v in marks.items() if v is m) for m in Mark}
    assert got[Mark.KEEP] == sorted(vector["expected_keep"]), vector["source"]
    assert got[Mark.REMOVE] == sorted(vector["expected_remove"]), vector["source"]
    assert got[Mark.PROTECTED] == sorted(vector["expected_protected"]), vector["source"]


def test_prune_vector_count_is_the_published_280() -> None:
    if not _LOADED:
        pytest.skip(f"prune vectors absent ({_VECTORS})")
    assert len(_LOADED) == 280


def _ts(text: str) -> int:
    return int(datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp())


def test_prune_covered_period_is_skipped_not_counted() -> None:
    times = ["2024-01-03T12:00", "2024-01-03T08:00", "2024-01-02T20:00", "2024-01-01T10:00"]
    backups = [PruneCandidate(t, _ts(t)) for t in times]
    marks = mark_prune(backups, KeepOptions(last=1, daily=2), UTC)
    assert marks == {
        times[0]: Mark.KEEP,
        times[1]: Mark.REMOVE,
        times[2]: Mark.KEEP,
        times[3]: Mark.KEEP,
    }


def test_prune_weeks_are_iso_weeks() -> None:
    # 2019-12-31 and 2020-01-01 are both in ISO week 2020-W01: one weekly slot
    times = ["2020-01-01T10:00", "2019-12-31T10:00", "2019-12-29T10:00"]
    marks = mark_prune([PruneCandidate(t, _ts(t)) for t in times], KeepOptions(weekly=2), UTC)
    assert [marks[t] for t in times] == [Mark.KEEP, Mark.REMOVE, Mark.KEEP]


def test_prune_protected_never_removed_and_uses_no_slot() -> None:
    times = ["2024-01-03T12:00", "2024-01-02T12:00", "2024-01-01T12:00"]
    backups = [PruneCandidate(t, _ts(t), protected=(i == 0)) for i, t in enumerate(times)]
    marks = mark_prune(backups, KeepOptions(last=1), UTC)
    assert [marks[t] for t in times] == [Mark.PROTECTED, Mark.KEEP, Mark.REMOVE]


def test_prune_no_option_keeps_everything() -> None:
    backups = [PruneCandidate(i, i * 3600) for i in range(5)]
    assert set(mark_prune(backups, KeepOptions(), UTC).values()) == {Mark.KEEP}
    assert set(mark_prune(backups, KeepOptions(), UTC, keep_all_fallback=False).values()) == {
        Mark.REMOVE
    }


def _reference(ctimes: list[int], protected: set[int], opts: KeepOptions) -> dict[int, str]:
    """An independent, deliberately naive model written from the README's rules."""
    if not opts.keeps_something():
        return {c: ("protected" if c in protected else "keep") for c in ctimes}
    order = sorted(ctimes, reverse=True)
    mark: dict[int, str] = {}
    rules = [
        (opts.last, lambda c: str(c)),
        (opts.hourly, lambda c: datetime.fromtimestamp(c, UTC).strftime("%Y%m%d%H")),
        (opts.daily, lambda c: datetime.fromtimestamp(c, UTC).strftime("%Y%m%d")),
        (opts.weekly, lambda c: str(datetime.fromtimestamp(c, UTC).isocalendar()[:2])),
        (opts.monthly, lambda c: datetime.fromtimestamp(c, UTC).strftime("%Y%m")),
        (opts.yearly, lambda c: datetime.fromtimestamp(c, UTC).strftime("%Y")),
    ]
    for n, per in rules:
        if n <= 0:
            continue
        already = [per(c) for c in order if mark.get(c) == "keep"]
        kept: list[str] = []
        for c in order:
            if c in mark:
                continue
            if c in protected:
                mark[c] = "protected"
            elif per(c) in already:
                pass
            elif per(c) in kept:
                mark[c] = "remove"
            elif len(kept) < n:
                kept.append(per(c))
                mark[c] = "keep"
            else:
                break
    return {c: mark.get(c, "protected" if c in protected else "remove") for c in ctimes}


@pytest.mark.parametrize("seed", range(40))
def test_prune_matches_reference_model_on_random_series(seed: int) -> None:
    rng = random.Random(seed)
    start = _ts("2019-06-01T00:00")
    step = rng.choice([600, 3600, 86400, 5 * 86400])
    ctimes = sorted({start + rng.randrange(0, 400 * step) for _ in range(rng.randrange(1, 60))})
    protected = {c for c in ctimes if rng.random() < 0.1}
    opts = KeepOptions(
        **{
            k: rng.choice([0, 0, 1, 2, 3, 5])
            for k in ("last", "hourly", "daily", "weekly", "monthly", "yearly")
        }
    )
    marks = mark_prune([PruneCandidate(c, c, c in protected) for c in ctimes], opts, UTC)
    assert {c: m.value for c, m in marks.items()} == _reference(ctimes, protected, opts)


def test_parse_keep_options_round_trip_and_refusals() -> None:
    opts = parse_keep_options("keep-last=3, keep-daily=7,keep-yearly=1")
    assert opts == KeepOptions(last=3, daily=7, yearly=1)
    assert format_keep_options(opts) == "keep-last=3,keep-daily=7,keep-yearly=1"
    assert parse_keep_options("keep-all=1").keep_all
    for bad in (
        "keep-last=-1",
        "keep-last=3,keep-last=4",
        "keep-forever=1",
        "keep-all=1,keep-last=2",
        "keep-last=99999999999",
    ):
        with pytest.raises(ValueError):
            parse_keep_options(bad)
