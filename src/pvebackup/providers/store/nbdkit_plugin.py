"""nbdkit python plugin: serve one device of one snapshot, read-only.

Run by :mod:`pvebackup.providers.store.restore_server` as::

    nbdkit -U SOCK -P PIDFILE -f --exit-with-parent python nbdkit_plugin.py \\
        backend=local store=PATH snapshot=vm/100/2026-...Z device=drive-scsi0 [keyfd=N]

It runs inside Debian's ``/usr/bin/python3`` (the interpreter nbdkit's python
plugin embeds); the parent sets ``PYTHONPATH`` so that pvebackup and its
dependencies are found. An encrypted store's raw key arrives through the inherited
pipe ``keyfd`` (never argv or the environment); the plugin reads it once and closes
the pipe. Errors are written to stderr (which the parent keeps in a file) with the
prefix ``pvebackup restore:`` and fail the NBD request with EIO.
"""

from __future__ import annotations

import errno
import os
import threading
from typing import Any

import nbdkit

from pvebackup.api.errors import IntegrityError

API_VERSION = 2

_config: dict[str, str] = {}
_image: Any = None
_lock = threading.Lock()


def _error(message: str) -> None:
    # One write(2) per line: nbdkit's threads report at the same time.
    os.write(2, f"pvebackup restore: {message}\n".encode(errors="replace"))


def thread_model() -> int:
    return int(nbdkit.THREAD_MODEL_PARALLEL)


def config(key: str, value: str) -> None:
    if key not in ("backend", "store", "snapshot", "device", "keyfd"):
        raise RuntimeError(f"unknown parameter {key}")
    _config[key] = value


def config_complete() -> None:
    global _image
    from pvebackup.providers.store.restore_source import open_image

    key_material: bytes | None = None
    if "keyfd" in _config:
        fd = int(_config["keyfd"])
        try:
            key_material = b""
            while len(key_material) < 64:
                part = os.read(fd, 64 - len(key_material))
                if not part:
                    break
                key_material += part
        finally:
            os.close(fd)
    try:
        _image = open_image(
            _config.get("backend", "local"),
            _config["store"],
            _config["snapshot"],
            _config["device"],
            key_material,
        )
    except Exception as exc:
        _error(f"cannot open {_config.get('snapshot')} {_config.get('device')}: {exc}")
        raise


def open(readonly: bool) -> int:  # the nbdkit plugin API names it so (shadows the builtin)
    return 1


def get_size(h: int) -> int:
    return int(_image.size)


def can_write(h: int) -> bool:
    return False


def can_multi_conn(h: int) -> bool:
    return True


def can_extents(h: int) -> bool:
    return True


def can_cache(h: int) -> int:
    return int(nbdkit.CACHE_NONE)


def extents(h: int, count: int, offset: int, flags: int) -> list[tuple[int, int, int]]:
    result: list[tuple[int, int, int]] = _image.extents(count, offset)
    return result


def pread(h: int, buf: bytearray, offset: int, flags: int) -> None:
    try:
        _image.pread(buf, offset)
    except IntegrityError as exc:
        _error(f"integrity: {exc}")  # the provider raises CorruptChunkError from this
        nbdkit.set_error(errno.EIO)
        raise
    except Exception as exc:
        _error(str(exc))
        nbdkit.set_error(errno.EIO)
        raise


def unload() -> None:
    if _image is not None:
        _image.close()
