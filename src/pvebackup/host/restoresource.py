"""What a provider hands a restore, checked, and the qemu-img copy of a disk.

Provider answers (mechanism, device sizes, source names) come from the backup:
hostile input, answered with typed errors. The ``*_init``/``*_cleanup`` pairing
lives here too: the seed wants the cleanup "in both, success and failure
scenarios".
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from pvebackup.api.errors import (
    IntegrityError,
    PluginError,
    PveBackupError,
    UnsupportedError,
)
from pvebackup.api.types import GuestType, RestoreMechanism
from pvebackup.host.tasklog import LogRouter
from pvebackup.kit import qemuimg
from pvebackup.kit.crashpoint import crash_point
from pvebackup.kit.pacing import PROGRESS_INTERVAL, progress_text

__all__ = [
    "convert_progress",
    "describe",
    "device_size",
    "paired",
    "qemu_img_convert",
    "restore_mechanism",
    "source_format",
]


def describe(exc: BaseException) -> str:
    if isinstance(exc, PveBackupError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


@contextmanager
def paired(
    log: LogRouter, method: str, init: Callable[[], str], cleanup: Callable[[], None]
) -> Iterator[str]:
    """``<method>_init``, the body, and ``<method>_cleanup`` always after it.

    The seed calls the cleanup "in both, success and failure scenarios", and a
    provider may fail half-way through its init (an nbdkit started, a temporary
    directory made): so the cleanup also runs when the init raised. Its own
    failure then is logged and the init's error is the one raised (a provider
    may have nothing to clean). After a successful init a failing cleanup is
    raised (chained to the body's error, if any): backup-store's cleanup
    names the corrupt chunk that qemu-img only saw as EIO (exit 5).
    """
    try:
        value = init()
    except BaseException:
        try:
            cleanup()
        except Exception as exc:
            log.err(f"{method}_cleanup after a failed init: {describe(exc)}")
        raise
    try:
        if not isinstance(value, str | os.PathLike) or not str(value):
            raise PluginError(f"{method}_init returned {value!r:.80}, not a path or URI")
        yield str(value)
    finally:
        cleanup()


def convert_progress(log: LogRouter, devicename: str, size: int) -> Callable[[float], None]:
    """qemu-img's percentages as the backup's progress: a bar on a terminal, a
    line every few seconds and one at the end, both from one formula."""
    start = time.monotonic()
    next_line = start + PROGRESS_INTERVAL
    finished = False

    def report(percent: float) -> None:
        nonlocal next_line, finished
        if finished:
            return
        now = time.monotonic()
        done, final = int(size * min(percent, 100.0) / 100), percent >= 100.0
        line = None
        if final or now >= next_line:
            next_line = now + PROGRESS_INTERVAL
            line = progress_text(devicename, done, size, now - start, final=final)
        finished = final
        log.progress(devicename, done, size, now - start, line, final)

    return report


def restore_mechanism(answer: object) -> tuple[RestoreMechanism, GuestType]:
    """Check ``restore_get_mechanism``'s answer: a typed error, never a ValueError.

    :raises UnsupportedError: a mechanism or guest type this host does not know.
    :raises PluginError: not a ``(mechanism, vmtype)`` pair.
    """
    if not isinstance(answer, tuple | list) or len(answer) != 2:
        raise PluginError(
            f"restore_get_mechanism returned {answer!r:.80}, not (mechanism, vmtype)"
        )
    mechanism, vmtype = answer
    try:
        mech = RestoreMechanism(mechanism)
    except ValueError as exc:
        known = ", ".join(m.value for m in RestoreMechanism)
        raise UnsupportedError(
            f"restore_get_mechanism: unknown restore mechanism {mechanism!r:.40} ({known})"
        ) from exc
    try:
        kind = GuestType(vmtype)
    except ValueError as exc:
        known = ", ".join(t.value for t in GuestType)
        raise UnsupportedError(
            f"restore_get_mechanism: unknown guest type {vmtype!r:.40} ({known})"
        ) from exc
    return mech, kind


_FORMAT_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")


def source_format(source: str) -> str:
    """The format ``qemu-img convert`` reads ``source`` as: always explicit, never probed.

    What a provider hands over is untrusted raw disk data, as in Proxmox VE: a
    path or an NBD URI is read as ``raw``. Probing would let the first bytes of a
    guest's raw disk (a qcow2 header naming ``/etc/shadow`` as its backing file)
    decide what qemu opens. A provider that stores another format says so in a
    ``json:`` pseudo-file name whose top-level ``driver`` is the format (and whose
    options pin every file qemu may open: see backup-dir's images module).

    :raises PluginError: a ``json:`` name without a plain top-level driver.
    """
    if not source.startswith("json:"):
        return "raw"
    try:
        spec = json.loads(source[len("json:") :])
    except ValueError as exc:
        raise PluginError(f"restore source is not a valid json: file name: {exc}") from exc
    driver = spec.get("driver") if isinstance(spec, dict) else None
    if not isinstance(driver, str) or not _FORMAT_NAME.match(driver):
        raise PluginError(
            f"restore source json: file name names no format driver (got {driver!r})"
        )
    return driver


_MAX_DISK_SIZE = 1 << 63


def device_size(entry: object, devicename: str) -> int:
    """The disk size a provider reports, checked: it sizes the volume we allocate.

    It comes from the backup (a manifest, an ``index.json``), so a wrong type or a
    size no disk can have is an ``IntegrityError``, not a traceback or a 1 EiB volume.
    """
    size = entry.get("size") if isinstance(entry, dict) else None
    if not isinstance(size, int) or isinstance(size, bool) or not 0 < size < _MAX_DISK_SIZE:
        raise IntegrityError(f"{devicename}: the backup gives no valid disk size ({size!r:.40})")
    return size


def qemu_img_convert(
    source: str,
    target: str | os.PathLike[str],
    progress: Callable[[float], None] | None = None,
    *,
    interval: float = 5.0,
    target_fmt: str = "qcow2",
    target_is_zero: bool = True,
    rate: int = 0,
) -> None:
    """``qemu-img convert`` ``source`` into the existing ``target`` of ``target_fmt``.

    ``target_is_zero``: the new volume reads as zeroes, so zero areas are not
    written; a thick LV holds old data and gets every block written.

    ``source`` is read as raw unless it is a ``json:`` name with a driver
    (:func:`source_format`). ``progress(percent)`` is called at most every
    ``interval`` seconds while it runs and once with 100 at the end.
    """
    report = qemuimg.throttled(progress, interval) if progress is not None else None

    def on_progress(percent: float) -> None:
        crash_point("restore-mid-convert")
        if report is not None:
            report(percent)

    # Both formats explicit: the source as the provider declared it (raw unless
    # it said otherwise), the target as allocated.
    qemuimg.convert(
        source,
        target,
        source_fmt=source_format(source),
        target_fmt=target_fmt,
        target_exists=True,
        target_is_zero=target_is_zero,
        progress=on_progress,
        rate_limit=rate or None,
    )
