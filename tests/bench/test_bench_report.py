"""Goal verdicts, the stdout table and results.json of the benchmark."""

from __future__ import annotations

import json
from pathlib import Path

from bench.measure import Measurement
from bench.ours import PYTHON_NAME
from bench.report import GOALS, evaluate, format_bytes, format_report, format_sweep, write_json

MiB = 1 << 20
INFO = {"dense": "1 GiB", "sparse": "64 GiB", "change": "160 x 64 KiB",
        "summary": "test", "machine": "2 x test cpu"}


def m(scenario: str, tool: str, seconds: list[float], size: list[int] | None = None,
      rss: dict[str, int] | None = None, error: str | None = None) -> Measurement:
    return Measurement(scenario, tool, seconds, size or [], rss or {}, error)


def measurements(ours_full: float = 1.0) -> list[Measurement]:
    return [
        m("full", "ours", [ours_full, 1.2, 100.0], [600 * MiB] * 3),
        m("full", "borg lz4", [5.3, 5.2, 5.4], [700 * MiB] * 3),
        m("incremental", "ours", [0.3], [20 * MiB]),
        m("incremental", "borg lz4", [4.8], [325 * MiB]),
        m("incremental", "restic", [5.5], [213 * MiB]),
        m("restore", "local convert", [1.0]),
        m("restore", "ours", [1.05]),
        m("sparse-full", "ours", [2.0], rss={PYTHON_NAME: 90 * MiB,
                                             "qemu-storage-d": 300 * MiB}),
        m("sparse-incremental", "ours", [0.6]),
    ]


def verdicts(ms: list[Measurement]) -> dict[str, str]:
    return {g.name: g.verdict for g in evaluate(ms)}


def test_median_is_used_and_goals_pass_or_miss() -> None:
    results = {g.name: g for g in evaluate(measurements())}
    full = results["full backup: borg lz4 time / ours"]
    assert full.value is not None and abs(full.value - 5.3 / 1.2) < 1e-9  # medians
    assert full.verdict == "PASS"
    incr = results["incremental: fastest borg/restic re-run / ours"]
    assert incr.value is not None and abs(incr.value - 16.0) < 1e-9
    sparse = results["incremental: sparse image / dense image (ours)"]
    assert sparse.verdict == "MISS"  # 0.6 / 0.3 = 2x > 1.5x
    assert results["store growth: ours / restic"].verdict == "PASS"
    assert results["restore: speed of ours / local convert"].verdict == "PASS"  # 0.95
    rss = results["peak RSS of pvebackup, sparse full backup"]
    assert rss.value == 90.0 and rss.verdict == "PASS"  # qemu-storage-daemon not counted


def test_slow_full_backup_misses() -> None:
    ms = measurements(ours_full=4.0)
    ms[0] = m("full", "ours", [4.0, 4.0, 4.0])  # 5.3 / 4.0 < 1.5
    assert verdicts(ms)["full backup: borg lz4 time / ours"] == "MISS"


def test_missing_or_failed_measurements_give_n_a() -> None:
    ms = [x for x in measurements() if x.tool != "restic"]
    ms[0] = m("full", "ours", [], error="boom")
    v = verdicts(ms)
    assert v["full backup: borg lz4 time / ours"] == "n/a"
    assert v["store growth: ours / restic"] == "n/a"
    assert len(v) == len(GOALS)


def test_report_shows_rows_ratios_errors_and_verdicts() -> None:
    ms = measurements()
    ms.append(m("full", "restic", [], error="restic exited 1: no password"))
    ms.append(m("unchanged", "ours", [0.35], [150 * 1024]))
    text = format_report(ms, evaluate(ms), INFO, ours_error=None)
    assert "full backup of the 1 GiB qcow2 image" in text
    assert "re-run with nothing changed (ours: fixed cost per backup)" in text
    assert "re-run after the 160 x 64 KiB change" in text
    borg = next(line for line in text.splitlines() if line.strip().startswith("borg lz4"))
    assert "5.30 s" in borg and "4.42x" in borg and "700.0 MiB" in borg
    assert "restic                     error: restic exited 1: no password" in text
    assert "peak RSS: pvebackup (python) 90.0 MiB, qemu-storage-d 300.0 MiB" in text
    assert "MISS" in text and "PASS" in text
    assert "not available" not in text


def test_report_says_when_ours_is_not_available() -> None:
    peers_only = [x for x in measurements() if x.tool != "ours"]
    text = format_report(peers_only, evaluate(peers_only), INFO,
                         ours_error="pvebackup.cli.main does not exist yet")
    assert "ours: not available (pvebackup.cli.main does not exist yet)" in text
    assert "borg lz4" in text and "n/a" in text


def test_json_holds_measurements_goals_and_extra(tmp_path: Path) -> None:
    ms = measurements()
    path = tmp_path / "out" / "results.json"
    write_json(path, ms, evaluate(ms), {"machine": {"nproc": 2}})
    doc = json.loads(path.read_text())
    assert doc["machine"] == {"nproc": 2}
    assert doc["measurements"][0]["median_seconds"] == 1.2
    assert doc["measurements"][0]["median_size"] == 600 * MiB
    assert {g["verdict"] for g in doc["goals"]} == {"PASS", "MISS", "n/a"}  # n/a: not given


def test_sweep_table_and_byte_formatting() -> None:
    ms = [
        m("sweep 64K full", "ours", [2.0], [500 * MiB]),
        m("sweep 64K incremental", "ours", [0.2], [12 * MiB]),
        m("sweep 4M full", "ours", [1.0], [480 * MiB]),
        m("sweep 4M incremental", "ours", [0.1], error="export refused"),
    ]
    lines = format_sweep(ms, ["64K", "4M", "1M"]).splitlines()
    assert "64K" in lines[1] and "2.00s" in lines[1] and "12.0 MiB" in lines[1]
    assert lines[2] == "4M           error: export refused"
    assert lines[3] == "1M           error: not measured"
    assert (format_bytes(512), format_bytes(3 * MiB // 2), format_bytes(None)) == (
        "512 B", "1.5 MiB", "-")


def test_goal_values_carry_their_unit() -> None:
    text = format_report(measurements(), evaluate(measurements()), INFO, ours_error=None)
    rss = next(line for line in text.splitlines() if line.strip().startswith("peak RSS of"))
    assert "90.0 MiB" in rss and "<= 200 MiB" in rss and rss.endswith("PASS")
    growth = next(line for line in text.splitlines() if "store growth" in line)
    assert "0.09x" in growth and "<= 0.333x" in growth


def test_the_issue_table_lines_gc_objects_and_chunk_index() -> None:
    ms = measurements()
    ms[0].values["objects_per_gib"] = 150.0
    ms += [
        m("full", "zstd -1 -T2", [1.0], [650 * MiB]),
        m("full", "borg zstd,3", [6.0], [560 * MiB]),
        m("unchanged", "ours", [0.35], [150 * 1024]),
        m("gc", "ours", [3.0], [40 * MiB], rss={"gc (python)": 250 * MiB}),
        Measurement("chunk index", "ours", [60.0],
                    values={"lookups_per_s": 250_000.0, "peak_rss_mib": 60.0}),
    ]
    results = {g.name: g for g in evaluate(ms)}
    assert results["full backup: ours time / zstd -1 -T2"].verdict == "PASS"  # 1.2 / 1.0
    stored = results["full backup: stored ours / borg zstd,3"]
    assert stored.verdict == "MISS" and stored.value == 600 / 560
    assert results["backup with nothing changed (ours)"].verdict == "MISS"  # 0.35 s > 0.2 s
    assert results["objects written per GiB of new data (ours)"].verdict == "MISS"
    assert results["peak RSS of GC of the bench store"].verdict == "MISS"
    assert results["chunk index, 10M chunks: lookups/s"].verdict == "PASS"
    assert results["chunk index, 10M chunks: peak RSS"].verdict == "PASS"
    text = format_report(ms, evaluate(ms), INFO, ours_error=None)
    assert "GC after removing the older half of the snapshots" in text
    assert "lookups_per_s: 250,000.0" in text
    line = next(x for x in text.splitlines() if "lookups/s" in x and "chunk index, 10M" in x)
    assert "250,000/s" in line and ">= 200,000/s" in line and line.endswith("PASS")
    unchanged = next(x for x in text.splitlines() if "nothing changed (ours)" in x)
    assert "0.35 s" in unchanged and "<= 0.2 s" in unchanged


def test_s3_goals_compare_with_the_local_store_and_count_puts() -> None:
    from bench.ours import OURS_S3

    s3_full = m("full", OURS_S3, [1.6])
    s3_full.values["PUT per GiB of image data"] = 84.0
    ms = [*measurements(), s3_full, m("incremental", OURS_S3, [0.6]),
          m("restore", OURS_S3, [1.4])]  # fmt: skip
    results = {g.name: g for g in evaluate(ms)}
    full = results["S3 full backup: speed vs local store"]
    assert full.value is not None and abs(full.value - 1.2 / 1.6) < 1e-9
    assert full.verdict == "PASS"
    assert results["S3 incremental: speed vs local store"].verdict == "MISS"  # 0.5x
    assert results["S3 restore: speed vs local store"].verdict == "PASS"  # 0.75x
    assert results["S3 PUT requests per GiB of new data (full)"].verdict == "PASS"
    assert "ours on S3 (Ceph RGW)" in format_report(ms, evaluate(ms), INFO, None)
    # Without RGW: n/a, never a pass.
    assert verdicts(measurements())["S3 restore: speed vs local store"] == "n/a"
