"""pvebackup.store.backends: where a datastore keeps its objects.

:func:`make_backend` is the one place that turns a backend's name (the
``backend`` storage property) into a :class:`~.base.Backend`; the provider's
settings and the restore server's plugin process both call it.
"""

from __future__ import annotations

from pvebackup.api.errors import UsageError
from pvebackup.store.backends.base import Backend
from pvebackup.store.backends.local import LocalBackend

__all__ = ["make_backend"]


def make_backend(kind: str, location: str) -> Backend:
    """The backend ``kind`` at ``location``: ``local`` (a directory) or ``s3``
    (:meth:`S3Config.location <pvebackup.store.backends.s3.S3Config.location>`;
    the bucket, behind the retry wrapper)."""
    if kind == "local":
        return LocalBackend(location)
    if kind == "s3":
        # Imported here: boto3 takes 0.3 s to import, and local stores never need it.
        from pvebackup.store.backends.retry import RetryBackend
        from pvebackup.store.backends.s3 import S3Backend, S3Config

        return RetryBackend(S3Backend(S3Config.from_location(location)))
    raise UsageError(f"unknown store backend {kind!r}")
