"""Every backend the conformance suite runs against (S3 joins later)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from pvebackup.store.backends.base import Backend
from pvebackup.store.backends.local import LocalBackend
from pvebackup.store.backends.memory import MemoryBackend

BackendFactory = Callable[[], Backend]


@pytest.fixture(params=["memory", "local"])
def make_backend(request: pytest.FixtureRequest, tmp_path: Path) -> BackendFactory:
    """A factory of handles to ONE store: two calls see the same objects."""
    if request.param == "memory":
        shared = MemoryBackend()
        return lambda: shared
    return lambda: LocalBackend(tmp_path / "store")


@pytest.fixture
def backend(make_backend: BackendFactory) -> Backend:
    return make_backend()
