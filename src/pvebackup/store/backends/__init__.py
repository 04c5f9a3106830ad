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
    """The backend ``kind`` (``local``) at ``location`` (a directory)."""
    if kind == "local":
        return LocalBackend(location)
    raise UsageError(f"unknown store backend {kind!r}")
