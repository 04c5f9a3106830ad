"""`make demo` keeps working: the whole main job on the sample node."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
@pytest.mark.e2e
def test_demo_restores_both_guests_identical(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "pvebackup.demo", "--dir", str(tmp_path / "demo")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = proc.stdout.split("==> summary", 1)[1]
    rows = [
        line.split()
        for line in summary.splitlines()
        if line.startswith(("first", "second", "restore", "live"))
    ]
    assert [r[-1] for r in rows if r[0] == "restore"] == ["identical"] * 3
    second_vm = next(r for r in rows if r[0] == "second" and r[3] == "100")
    assert "incremental" in second_vm
    assert "every guest restored identical" in proc.stdout
    assert any(r[:2] == ["live", "backup"] and "snapshot" in r for r in rows)
