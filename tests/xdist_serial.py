"""Parallel runs (``pytest -n 2``, pytest-xdist; ``make test`` runs so): a plugin that
tests/conftest.py loads.

A test marked ``serial`` (it measures a time or a rate) runs while no other test
runs: it holds a run-wide lock exclusively, every other test holds it shared. Without
xdist this is a no-op. (xdist's ``--dist loadgroup`` would have let the S3 tests share
one RGW, but xdist 3.8 cannot group under pytest 9.2: it renames ``item._nodeid``,
which pytest no longer reads. So each worker that meets an S3 test starts its own.)
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator

import pytest

WORKER_ENV = "PYTEST_XDIST_WORKER"


@pytest.fixture(autouse=True)
def _serial_lock(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[None]:
    """The run-wide lock; its file is in the temp dir the workers of one run share
    (each worker's basetemp is a ``popen-gwN`` below it), so two runs never meet."""
    if WORKER_ENV not in os.environ:
        yield
        return
    exclusive = request.node.get_closest_marker("serial") is not None
    lock = tmp_path_factory.getbasetemp().parent / "serial.lock"
    with open(lock, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
