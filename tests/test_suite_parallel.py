"""tests/xdist_support.py under a real pytest-xdist run of a small generated suite."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("xdist") is None, reason="pytest-xdist not installed"
)

HEADER = """
import json, os, time
from pathlib import Path

import pytest


@pytest.fixture
def record(tmp_path):
    def record(name, seconds):
        start = time.monotonic()
        time.sleep(seconds)
        line = {"name": name, "worker": os.environ["PYTEST_XDIST_WORKER"],
                "start": start, "end": time.monotonic(), "basetemp": str(tmp_path.parent)}
        with open(Path(os.environ["RECORD"]), "a") as f:
            f.write(json.dumps(line) + "\\n")
    return record

"""


def test_serial_tests_run_alone_and_worker_temp_dirs_stay_short(tmp_path: Path) -> None:
    suite = tmp_path / "suite"
    suite.mkdir()
    (suite / "conftest.py").write_text('pytest_plugins = ["xdist_support"]\n')
    (suite / "pytest.ini").write_text("[pytest]\nmarkers =\n    serial: x\n")
    # The serial test first: without the lock it would start beside a plain one.
    serial = "@pytest.mark.serial\ndef test_serial(record):\n    record('serial', 1.0)\n\n"
    plain = "".join(
        f"def test_plain_{n}(record):\n    record('plain{n}', 0.5)\n\n" for n in range(5)
    )
    (suite / "test_a.py").write_text(HEADER + serial + plain)
    record = tmp_path / "record.jsonl"
    base = tmp_path / "base"
    env = dict(os.environ, RECORD=str(record))
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), *sys.path])
    env.pop("PYTEST_XDIST_WORKER", None)  # this suite itself may run under xdist
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "2",
         "--basetemp", str(base), str(suite)],
        capture_output=True, text=True, cwd=suite, env=env, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    runs = {r["name"]: r for r in map(json.loads, record.read_text().splitlines())}
    assert len(runs) == 6
    assert len({r["worker"] for r in runs.values()}) == 2  # it did run in parallel
    # <base>/0, <base>/1: as short as can be (xdist's own: <base>/popen-gw0).
    assert {r["basetemp"] for r in runs.values()} == {str(base / "0"), str(base / "1")}
    alone = runs.pop("serial")
    overlapping = [
        n for n, r in runs.items() if r["start"] < alone["end"] and alone["start"] < r["end"]
    ]
    assert overlapping == []
