"""Parallel runs (``pytest -n 2``, pytest-xdist; ``make test`` runs so): a plugin that
tests/conftest.py loads.

Each worker's temp dir is ``<run's dir>/N``, not xdist's ``<run's dir>/popen-gwN``: the
code under test binds Unix sockets (QMP, NBD) below ``tmp_path``, and a socket path
must be shorter than 108 bytes; xdist's 10 more bytes broke tests with long names.

A test marked ``serial`` (it measures a time or a rate) runs while no other test
runs: it holds a run-wide lock exclusively, every other test holds it shared. Without
xdist this is a no-op. (xdist's ``--dist loadgroup`` would have let the S3 tests share
one RGW, but xdist 3.8 cannot group under pytest 9.2: it renames ``item._nodeid``,
which pytest no longer reads. So each worker that meets an S3 test starts its own.)
"""

from __future__ import annotations

import fcntl
from collections.abc import Iterator
from pathlib import Path

import pytest


def _worker(config: pytest.Config) -> str | None:
    """This process's xdist worker id (gw0, ...), or None. Not from the environment:
    a pytest that a test starts inherits PYTEST_XDIST_WORKER but is no worker."""
    workerinput = getattr(config, "workerinput", None)
    return None if workerinput is None else str(workerinput["workerid"])


@pytest.hookimpl(tryfirst=True)  # before the tmp_path plugin reads the option
def pytest_configure(config: pytest.Config) -> None:
    worker = _worker(config)
    given = config.option.basetemp
    if worker and given and Path(given).name == f"popen-{worker}":
        config.option.basetemp = str(Path(given).with_name(worker.removeprefix("gw")))


@pytest.fixture(autouse=True)
def _serial_lock(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[None]:
    """The run-wide lock; its file is in the temp dir the workers of one run share
    (each worker's basetemp is below it: see pytest_configure), so two runs never meet."""
    if _worker(request.config) is None:
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
