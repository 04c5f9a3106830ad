"""Goals, the table on stdout and ``results.json``.

Times are medians over the runs; sizes are bytes allocated on disk (``du``). In
the table, "vs ours" divides the tool's median time by ours in the same scenario,
so 3.0x means ours took a third of the time.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from bench.measure import Measurement
from bench.ours import OURS, OURS_S3, PYTHON_NAME
from pvebackup.kit import units

__all__ = [
    "Goal",
    "GoalResult",
    "GOALS",
    "evaluate",
    "format_bytes",
    "format_report",
    "format_sweep",
    "write_json",
]

MiB = 1 << 20
BORG_AND_RESTIC = ("borg lz4", "borg zstd,3", "restic")

Lookup = Callable[[str, str], Measurement | None]


def format_bytes(n: int | None) -> str:
    """:func:`pvebackup.kit.units.format_bytes`, ``-`` for an unknown size."""
    return "-" if n is None else units.format_bytes(n)


def _seconds(find: Lookup, scenario: str, tool: str) -> float | None:
    m = find(scenario, tool)
    return m.median_seconds if m is not None and not m.error else None


def _size(find: Lookup, scenario: str, tool: str) -> int | None:
    m = find(scenario, tool)
    return m.median_size if m is not None and not m.error else None


def _div(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b <= 0:
        return None
    return a / b


@dataclass(frozen=True, slots=True)
class Goal:
    """A goal: ``value(find)`` compared with ``target`` (``at_least`` or at most)."""

    name: str
    target: float
    at_least: bool
    unit: str  # "x" for ratios, "MiB" for sizes
    value: Callable[[Lookup], float | None]

    def target_text(self) -> str:
        op = ">=" if self.at_least else "<="
        if self.unit == "x":
            return f"{op} {self.target:.3g}x"
        if self.unit in ("/s", "objects"):
            return f"{op} {self.target:,.0f}{self.unit if self.unit == '/s' else ''}"
        return f"{op} {self.target:.3g} {self.unit}"


@dataclass(frozen=True, slots=True)
class GoalResult:
    name: str
    target: str
    value: float | None
    passed: bool | None  # None: could not be measured
    unit: str = "x"

    @property
    def value_text(self) -> str:
        if self.value is None:
            return "-"
        if self.unit == "x":
            return f"{self.value:.2f}x"
        if self.unit == "s":
            return f"{self.value:.2f} s"
        if self.unit in ("/s", "objects"):
            return f"{self.value:,.0f}{self.unit if self.unit == '/s' else ''}"
        return f"{self.value:.1f} {self.unit}"

    @property
    def verdict(self) -> str:
        return "n/a" if self.passed is None else ("PASS" if self.passed else "MISS")


def _full_vs_borg(find: Lookup) -> float | None:
    return _div(_seconds(find, "full", "borg lz4"), _seconds(find, "full", OURS))


def _full_vs_zstd(find: Lookup) -> float | None:
    return _div(_seconds(find, "full", OURS), _seconds(find, "full", ZSTD))


def _stored_vs_borg_zstd(find: Lookup) -> float | None:
    ours = _size(find, "full", OURS)
    return _div(float(ours) if ours is not None else None, _size(find, "full", "borg zstd,3"))


def _unchanged(find: Lookup) -> float | None:
    return _seconds(find, "unchanged", OURS)


def _incremental_vs_peers(find: Lookup) -> float | None:
    peers = [t for t in (_seconds(find, "incremental", p) for p in BORG_AND_RESTIC) if t]
    return _div(min(peers) if peers else None, _seconds(find, "incremental", OURS))


def _sparse_vs_dense(find: Lookup) -> float | None:
    return _div(_seconds(find, "sparse-incremental", OURS), _seconds(find, "incremental", OURS))


def _growth_vs_restic(find: Lookup) -> float | None:
    ours = _size(find, "incremental", OURS)
    return _div(float(ours) if ours is not None else None,
                _size(find, "incremental", "restic"))


def _value(scenario: str, name: str) -> Callable[[Lookup], float | None]:
    def get(find: Lookup) -> float | None:
        m = find(scenario, OURS)
        return None if m is None or m.error else m.values.get(name)
    return get


def _restore_vs_local(find: Lookup) -> float | None:
    return _div(_seconds(find, "restore", "local convert"), _seconds(find, "restore", OURS))


def _s3_speed(scenario: str) -> Callable[[Lookup], float | None]:
    def get(find: Lookup) -> float | None:
        return _div(_seconds(find, scenario, OURS), _seconds(find, scenario, OURS_S3))
    return get


def _s3_value(scenario: str, name: str) -> Callable[[Lookup], float | None]:
    def get(find: Lookup) -> float | None:
        m = find(scenario, OURS_S3)
        return None if m is None or m.error else m.values.get(name)
    return get


def _rss(scenario: str, process: str) -> Callable[[Lookup], float | None]:
    def get(find: Lookup) -> float | None:
        m = find(scenario, OURS)
        if m is None or m.error or process not in m.rss:
            return None
        return m.rss[process] / MiB
    return get


_peak_rss = _rss("sparse-full", PYTHON_NAME)

GC = "gc"
"""Scenario: GC of a store after removing the older half of its snapshots."""
CHUNK_INDEX = "chunk index"
"""Scenario: dedup lookups in the on-disk chunk index cache at 10 million chunks."""
CODECS = "codecs"
"""Scenario: digest and compression speeds on the bench's data (information)."""
GC_PROCESS = "gc (python)"
ZSTD = "zstd -1 -T2"

GOALS: tuple[Goal, ...] = (
    Goal("full backup: borg lz4 time / ours", 1.5, True, "x", _full_vs_borg),
    Goal("full backup: ours time / zstd -1 -T2", 1.2, False, "x", _full_vs_zstd),
    Goal("full backup: stored ours / borg zstd,3", 1.05, False, "x", _stored_vs_borg_zstd),
    Goal("backup with nothing changed (ours)", 0.2, False, "s", _unchanged),
    Goal("incremental: fastest borg/restic re-run / ours", 10.0, True, "x",
         _incremental_vs_peers),
    Goal("incremental: sparse image / dense image (ours)", 1.5, False, "x", _sparse_vs_dense),
    Goal("store growth: ours / restic", 1 / 3, False, "x", _growth_vs_restic),
    Goal("objects written per GiB of new data (ours)", 100.0, False, "objects",
         _value("full", "objects_per_gib")),
    Goal("restore: speed of ours / local convert", 0.9, True, "x", _restore_vs_local),
    Goal("peak RSS of pvebackup, sparse full backup", 200.0, False, "MiB", _peak_rss),
    Goal("peak RSS of GC of the bench store", 200.0, False, "MiB", _rss(GC, GC_PROCESS)),
    Goal("chunk index, 10M chunks: lookups/s", 200_000.0, True, "/s",
         _value(CHUNK_INDEX, "lookups_per_s")),
    Goal("chunk index, 10M chunks: peak RSS", 200.0, False, "MiB",
         _value(CHUNK_INDEX, "peak_rss_mib")),
    Goal("S3 full backup: speed vs local store", 0.7, True, "x", _s3_speed("full")),
    Goal("S3 incremental: speed vs local store", 0.7, True, "x", _s3_speed("incremental")),
    Goal("S3 restore: speed vs local store", 0.7, True, "x", _s3_speed("restore")),
    Goal("S3 PUT requests per GiB of new data (full)", 100.0, False, "objects",
         _s3_value("full", "PUT per GiB of image data")),
)


def evaluate(measurements: Iterable[Measurement],
             goals: Sequence[Goal] = GOALS) -> list[GoalResult]:
    """Each goal's value and verdict from ``measurements``."""
    table = {(m.scenario, m.tool): m for m in measurements}

    def find(scenario: str, tool: str) -> Measurement | None:
        return table.get((scenario, tool))

    results = []
    for goal in goals:
        value = goal.value(find)
        passed = None
        if value is not None:
            passed = value >= goal.target if goal.at_least else value <= goal.target
        results.append(GoalResult(goal.name, goal.target_text(), value, passed, goal.unit))
    return results


def _scenario_title(scenario: str, info: dict[str, str]) -> tuple[str, str]:
    """Heading and meaning of the size column for a scenario key."""
    titles = {
        "full": (f"full backup of the {info['dense']} qcow2 image", "stored"),
        "unchanged": ("re-run with nothing changed (ours: fixed cost per backup)", "growth"),
        "incremental": (f"re-run after the {info['change']} change", "growth"),
        "restore": (f"restore {info['dense']} to a raw file (qemu-img convert)", ""),
        "sparse-full": (f"full backup of the {info['sparse']} sparse image", "stored"),
        "sparse-incremental": (f"re-run after the same change, {info['sparse']} image",
                               "growth"),
        GC: ("GC after removing the older half of the snapshots (condemn + delete run)",
             "freed"),
        CODECS: ("digest and compression on the image's data (python -m bench.codecs)", ""),
        CHUNK_INDEX: ("chunk index cache, 10 million chunks (400k lookups, half misses)", ""),
    }
    if scenario in titles:
        return titles[scenario]
    return scenario, "growth" if scenario.endswith("incremental") else "stored"


def _row(m: Measurement, ours: float | None, size_label: str) -> str:
    if m.error:
        return f"  {m.tool:<26} error: {m.error}"
    seconds = m.median_seconds
    ratio = _div(seconds, ours)
    cells = [
        f"  {m.tool:<26}",
        f"{seconds:8.2f} s" if seconds is not None else f"{'-':>10}",
        f"{format_bytes(m.median_size):>11}" if size_label else " " * 11,
        f"{ratio:9.2f}x" if ratio is not None else f"{'':>10}",
        f"  ({len(m.seconds)} runs)",
    ]
    line = " ".join(cells)
    for k, v in m.values.items():
        line += f"\n  {'':<26} {k}: {v:,.1f}"
    if m.note:
        line += f"\n  {'':<26} {m.note}"
    if m.rss:
        peaks = ", ".join(f"{name} {format_bytes(v)}" for name, v in sorted(m.rss.items()))
        line += f"\n  {'':<26} peak RSS: {peaks}"
    return line


def format_report(measurements: Sequence[Measurement], goals: Sequence[GoalResult],
                  info: dict[str, str], ours_error: str | None) -> str:
    """The human-readable table (one block per scenario, then the goals)."""
    lines = [f"pvebackup benchmark: {info['summary']}"]
    if info.get("machine"):
        lines.append(f"machine: {info['machine']}")
    if ours_error:
        lines.append(f"ours: not available ({ours_error})")
    scenarios: list[str] = []
    for m in measurements:
        if m.scenario not in scenarios:
            scenarios.append(m.scenario)
    for scenario in scenarios:
        title, size_label = _scenario_title(scenario, info)
        lines += ["", title, f"  {'tool':<26} {'median':>10} {size_label:>11} {'vs ours':>10}"]
        ours_m = next((m for m in measurements
                       if m.scenario == scenario and m.tool == OURS), None)
        ours = ours_m.median_seconds if ours_m is not None and not ours_m.error else None
        lines += [_row(m, ours, size_label) for m in measurements if m.scenario == scenario]
    if goals:
        lines += ["", f"{'goal':<50} {'value':>9} {'target':>11}  result"]
        for g in goals:
            lines.append(f"  {g.name:<48} {g.value_text:>9} {g.target:>11}  {g.verdict}")
    return "\n".join(lines)


def write_json(path: Path, measurements: Sequence[Measurement], goals: Sequence[GoalResult],
               extra: dict[str, object]) -> None:
    """Write ``results.json``: ``extra`` (machine, config, versions), measurements, goals."""
    doc = {
        **extra,
        "measurements": [m.as_json() for m in measurements],
        "goals": [{**asdict(g), "verdict": g.verdict} for g in goals],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2) + "\n")


def format_sweep(measurements: Sequence[Measurement], chunk_sizes: Sequence[str]) -> str:
    """The chunk-size sweep: per size, full and incremental time, stored and growth."""
    lines = [f"{'chunk size':<12} {'full':>9} {'stored':>11} {'incremental':>12} {'growth':>11}"]
    table = {(m.scenario, m.tool): m for m in measurements}
    for size in chunk_sizes:
        full = table.get((f"sweep {size} full", OURS))
        incr = table.get((f"sweep {size} incremental", OURS))
        error = next((m.error for m in (full, incr) if m is not None and m.error), None)
        if error or full is None or incr is None:
            lines.append(f"{size:<12} error: {error or 'not measured'}")
            continue
        fs, is_ = full.median_seconds, incr.median_seconds
        lines.append(
            f"{size:<12} {fs or 0:8.2f}s {format_bytes(full.median_size):>11} "
            f"{is_ or 0:11.2f}s {format_bytes(incr.median_size):>11}"
        )
    return "\n".join(lines)
