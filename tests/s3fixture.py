"""pytest fixtures around the real S3 server (:mod:`pvebackup.testing.rgw`).

It starts only when a test asks for :func:`s3_server` (pytest fixtures are lazy),
once per session, and is stopped by PID at its end. Without the Debian packages
(``make s3deps``; ``make test`` installs them) the tests that need it are skipped
with a message saying so.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from pvebackup.testing.rgw import RGW, S3Server, make_bucket, missing_tools, s3_client

__all__ = ["RGW", "S3Server", "make_bucket", "s3_bucket", "s3_client", "s3_server"]


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """The session's RGW (started on first use); skips when Ceph is not installed."""
    missing = missing_tools()
    if missing:
        pytest.skip(
            f"Ceph RGW not installed (missing {', '.join(missing)}): run 'make s3deps' "
            "(apt-get install --no-install-recommends radosgw ceph-mon ceph-osd)"
        )
    rgw = RGW(tmp_path_factory.mktemp("rgw"))
    try:
        server = rgw.start()
        yield server
    finally:
        rgw.stop()


@pytest.fixture
def s3_bucket(s3_server: S3Server) -> str:
    """A fresh, empty bucket for one test."""
    return make_bucket(s3_server)
