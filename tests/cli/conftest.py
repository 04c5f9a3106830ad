"""Fixtures for the CLI tests: the sample node and recording provider of tests/host."""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

import pvebackup

HOST_TESTS = Path(__file__).resolve().parents[1] / "host"
if str(HOST_TESTS) not in sys.path:
    sys.path.insert(0, str(HOST_TESTS))

from recording_provider import TYPE, RecordingPlugin  # noqa: E402
from sample_node import Node  # noqa: E402

from pvebackup.storage import registry  # noqa: E402


@pytest.fixture
def cli_node(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Node]:
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    with registry.registered(RecordingPlugin):
        yield Node(tmp_path / "node")


@pytest.fixture
def subprocess_env(tmp_path: Path) -> dict[str, str]:
    """Environment in which ``python -m pvebackup`` finds the recording plugin.

    The plugin is announced the way any third-party plugin is: an entry point in
    a ``*.dist-info`` directory on the path.
    """
    dist = tmp_path / "site"
    info = dist / "pvebackup_testplugin-0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: pvebackup-testplugin\nVersion: 0\n"
    )
    (info / "entry_points.txt").write_text(
        f"[pvebackup.storage_plugins]\n{TYPE} = recording_provider:RecordingPlugin\n"
    )
    tmp = tmp_path / "subtmp"
    tmp.mkdir()
    env = dict(os.environ)
    # The pvebackup under test first (a worktree's src, not another editable install).
    src = Path(pvebackup.__file__).resolve().parents[1]
    env["PYTHONPATH"] = os.pathsep.join([str(src), str(HOST_TESTS), str(dist)])
    env["TMPDIR"] = str(tmp)
    return env
