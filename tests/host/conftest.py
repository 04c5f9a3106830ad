"""Fixtures for the job and restore tests (tests/host/test_*.py): a sample node root.

Fixture names are specific enough not to clash with the fixtures of
tests/host/qemu and tests/host/lxc.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from recording_provider import RecordingPlugin
from sample_node import Node

from pvebackup.storage import registry


@pytest.fixture
def job_tmpdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Temporary files of the code under test go below tmp_path, so tests can check them."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    return tmp


@pytest.fixture
def recording_plugin() -> Iterator[None]:
    with registry.registered(RecordingPlugin):
        yield


@pytest.fixture
def node(tmp_path: Path, job_tmpdir: Path, recording_plugin: None) -> Node:
    return Node(tmp_path / "node")
