"""Settings and fixtures shared by the whole suite.

Hypothesis profiles: ``ci`` (the default) is derandomized, so that a run is
repeatable and a failure seen once is seen again, and keeps no example database
(no ``.hypothesis/`` directory in the tree). ``HYPOTHESIS_PROFILE=explore`` runs the
property and fuzz tests with random seeds and ten times the examples, for a search
by hand.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import settings

from pvebackup.kit.hoststate import STATE_DIR_ENV
from s3fixture import s3_bucket, s3_server  # noqa: F401  (a real RGW, started on first use)

# Parallel runs (pytest -n 2): the S3 tests on one worker, `serial` tests alone.
pytest_plugins = ["xdist_support"]

settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
settings.register_profile("explore", max_examples=2000, database=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(autouse=True)
def host_state_dir(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> Path:
    """Providers keep their host-side state per test, never in the real /var/lib."""
    path = tmp_path_factory.mktemp("hoststate")
    monkeypatch.setenv(STATE_DIR_ENV, str(path))
    return path
