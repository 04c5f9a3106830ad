"""Timing, peak RSS and disk usage helpers of the benchmark."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from bench.measure import Measurement, Timed, ToolFailed, disk_usage, run_timed


def test_run_timed_reports_peak_rss_of_the_child() -> None:
    code = "b = bytearray(64 << 20); b[::4096] = b'x' * len(b[::4096]); import time; " \
           "time.sleep(0.3)"
    timed = run_timed([sys.executable, "-c", code], monitor_rss="child", cold=False)
    assert timed.seconds >= 0.3
    assert timed.rss["child"] >= 64 << 20


def test_run_timed_raises_with_the_stderr_tail() -> None:
    code = "import sys; print('first'); sys.exit('it broke')"
    with pytest.raises(ToolFailed, match="mytool exited 1: it broke"):
        run_timed([sys.executable, "-c", code], cold=False, label="mytool")


def test_disk_usage_counts_allocated_bytes(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "data").write_bytes(b"x" * (1 << 20))
    with (tmp_path / "d" / "hole").open("wb") as f:
        f.truncate(64 << 20)
    usage = disk_usage(tmp_path / "d")
    assert (1 << 20) <= usage < (2 << 20)
    assert disk_usage(tmp_path / "missing") == 0


def test_measurement_keeps_runs_and_max_rss() -> None:
    m = Measurement("full", "ours")
    m.add(Timed(2.0, {"p": 10}), 100)
    m.add(Timed(1.0, {"p": 30}), 300)
    m.add(Timed(3.0, {"p": 20}), 200)
    assert (m.median_seconds, m.median_size, m.rss) == (2.0, 200, {"p": 30})
