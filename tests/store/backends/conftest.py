"""Every backend the conformance suite runs against: memory, local, s3 (a real RGW)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pvebackup.store.backends.base import Backend
from pvebackup.store.backends.local import LocalBackend
from pvebackup.store.backends.memory import MemoryBackend
from pvebackup.store.backends.retry import RetryBackend

BackendFactory = Callable[[], Backend]


@pytest.fixture(
    params=["memory", "local", "retry", pytest.param("s3", marks=pytest.mark.s3)]
)
def make_backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[BackendFactory]:
    """A factory of handles to ONE store: two calls see the same objects."""
    if request.param == "memory":
        shared = MemoryBackend()
        yield lambda: shared
    elif request.param == "retry":
        wrapped = RetryBackend(MemoryBackend())
        yield lambda: wrapped
    elif request.param == "local":
        yield lambda: LocalBackend(tmp_path / "store")
    else:
        from pvebackup.store.backends.s3 import S3Backend, S3Config

        server = request.getfixturevalue("s3_server")
        bucket = request.getfixturevalue("s3_bucket")
        made: list[S3Backend] = []

        def make() -> Backend:
            # A key prefix, as a shared bucket has: the contract holds below it.
            config = S3Config(server.endpoint, bucket, prefix="store/one")
            backend = S3Backend(
                config, access_key=server.access_key, secret_key=server.secret_key
            )
            made.append(backend)
            return backend

        yield make
        for backend in made:
            backend.close()


@pytest.fixture
def backend(make_backend: BackendFactory) -> Backend:
    return make_backend()
