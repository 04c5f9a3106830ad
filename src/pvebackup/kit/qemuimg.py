"""The one ``qemu-img`` runner: info, create, convert, check, persistent bitmaps.

Every call goes through :func:`run` on top of :func:`pvebackup.kit.proc.run` (the
child dies with us and is reaped on every path) and has one error mapping:

- the image (or another file the command names) does not exist:
  :class:`NotFoundError`, with qemu-img's message;
- any other failure, also one to start qemu-img or a timeout:
  :class:`ExternalToolError` whose message starts with what was being done and
  ends with qemu-img's stderr.

A caller that knows more (backup-dir: "qemu-img refused the header of a stored
image" is an ``IntegrityError``) maps it itself with ``raise ... from exc``.

The image format is passed explicitly wherever the caller knows it: probing a
raw image whose guest wrote a qcow2 header would open the wrong thing (and
whatever backing file that header names).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pvebackup.api.errors import ExternalToolError, NotFoundError
from pvebackup.kit import proc

__all__ = [
    "BitmapInfo",
    "CheckResult",
    "ImageInfo",
    "bitmap_add",
    "bitmap_remove",
    "check",
    "compare",
    "convert",
    "create",
    "info",
    "info_json",
    "run",
    "throttled",
]

QEMU_IMG = "qemu-img"

_MISSING = "No such file or directory"


def _raise(what: str, returncode: int, stderr: str) -> None:
    message = f"{what}: {stderr or f'exit {returncode}'}"
    if _MISSING in stderr:
        raise NotFoundError(message)
    raise ExternalToolError(message, returncode=returncode, stderr=stderr)


def run(args: Sequence[str], *, what: str, timeout: float | None = None) -> str:
    """Run ``qemu-img ARGS`` to its end and return its stdout.

    :param what: what is being done, the start of every error message.
    :raises NotFoundError: a file it was to open does not exist.
    :raises ExternalToolError: anything else (cannot start, non-zero exit, timeout).
    """
    try:
        res = proc.run([QEMU_IMG, *args], timeout=timeout)
    except ExternalToolError as exc:
        raise ExternalToolError(f"{what}: {exc}") from exc
    if res.returncode != 0:
        _raise(what, res.returncode, res.err)
    return res.out


# -- info ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BitmapInfo:
    """A persistent dirty bitmap stored in a qcow2 image.

    ``flags`` as qemu-img reports them: ``auto`` (enabled: writes are recorded),
    ``in-use`` (a writer had the image open and did not close it cleanly, so the
    bitmap may miss writes and must not be trusted).
    """

    name: str
    granularity: int
    flags: frozenset[str]

    @property
    def in_use(self) -> bool:
        """The bitmap was not stored cleanly: it is inconsistent."""
        return "in-use" in self.flags

    @property
    def enabled(self) -> bool:
        """Writes to the image are recorded in the bitmap."""
        return "auto" in self.flags


@dataclass(frozen=True, slots=True)
class ImageInfo:
    """What ``qemu-img info`` says about one image."""

    path: Path
    format: str
    virtual_size: int
    bitmaps: tuple[BitmapInfo, ...]

    def bitmap(self, name: str) -> BitmapInfo | None:
        """The bitmap called ``name``, or None."""
        for bm in self.bitmaps:
            if bm.name == name:
                return bm
        return None


def info_json(
    path: str | os.PathLike[str],
    *,
    fmt: str | None = None,
    force_share: bool = False,
    timeout: float | None = None,
) -> dict[str, Any]:
    """``qemu-img info --output json`` of ``path`` (not of its backing chain), as a dict.

    :param fmt: the expected format; probing is used only when None.
    :param force_share: read even while another process holds the write lock
        (the answer may then be stale).
    """
    args = ["info", "--output", "json"]
    if fmt is not None:
        args += ["-f", fmt]
    if force_share:
        args.append("-U")
    out = run([*args, os.fspath(path)], what=f"qemu-img info {os.fspath(path)}", timeout=timeout)
    try:
        data = json.loads(out)
    except ValueError as exc:
        raise ExternalToolError(f"qemu-img info {os.fspath(path)}: unreadable output") from exc
    if not isinstance(data, dict):
        raise ExternalToolError(f"qemu-img info {os.fspath(path)}: unexpected output")
    return data


def info(path: Path, *, fmt: str | None = None, force_share: bool = False) -> ImageInfo:
    """``qemu-img info`` of ``path``: format, virtual size, persistent bitmaps."""
    data = info_json(path, fmt=fmt, force_share=force_share)
    try:
        specific = data.get("format-specific", {}).get("data", {})
        bitmaps = tuple(
            BitmapInfo(
                name=str(b["name"]),
                granularity=int(b.get("granularity", 0)),
                flags=frozenset(str(f) for f in b.get("flags", [])),
            )
            for b in specific.get("bitmaps", [])
        )
        return ImageInfo(
            path=path,
            format=str(data["format"]),
            virtual_size=int(data["virtual-size"]),
            bitmaps=bitmaps,
        )
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ExternalToolError(f"qemu-img info {path}: unexpected output: {exc}") from exc


# -- create, bitmaps ---------------------------------------------------------------


def create(
    path: str | os.PathLike[str],
    size: int,
    *,
    fmt: str = "qcow2",
    backing: str | None = None,
    backing_fmt: str | None = None,
    options: Sequence[str] = (),
) -> None:
    """Create a new image of ``size`` bytes (an existing file is overwritten).

    :param backing: backing file name recorded in the header, as given (a
        relative name is relative to the image's directory); needs ``backing_fmt``.
    :param options: ``-o`` options, e.g. ``["preallocation=metadata"]``.
    """
    args = ["create", "-q", "-f", fmt]
    if backing is not None:
        if backing_fmt is None:
            raise ValueError("a backing file needs its format (never probed)")
        args += ["-b", backing, "-F", backing_fmt]
    for option in options:
        args += ["-o", option]
    run([*args, os.fspath(path), str(size)], what=f"qemu-img create {os.fspath(path)}")


def bitmap_add(path: Path, name: str, *, enabled: bool = True) -> None:
    """Add an (empty) persistent bitmap to a qcow2 image."""
    args = ["bitmap", "-f", "qcow2", "--add"]
    if not enabled:
        args.append("--disable")
    run([*args, str(path), name], what=f"add bitmap {name} to {path}")


def bitmap_remove(path: Path, name: str) -> None:
    """Remove a persistent bitmap from a qcow2 image (also an in-use one)."""
    run(
        ["bitmap", "-f", "qcow2", "--remove", str(path), name],
        what=f"remove bitmap {name} from {path}",
    )


# -- check -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CheckResult:
    """``qemu-img check``: ``corruptions`` make the image unusable, ``leaks`` do not."""

    corruptions: int
    leaks: int
    raw: dict[str, Any]

    @property
    def clean(self) -> bool:
        return self.corruptions == 0 and self.leaks == 0


def check(path: str | os.PathLike[str], *, fmt: str) -> CheckResult:
    """``qemu-img check --output json`` (read only, never repairs).

    qemu-img exits 2 for corruptions and 3 for leaks; both are answers, not
    failures, and come back in the result. Exit 1 (cannot check) and 63 (format
    without checks) raise.
    """
    what = f"qemu-img check {os.fspath(path)}"
    try:
        res = proc.run([QEMU_IMG, "check", "--output", "json", "-f", fmt, os.fspath(path)])
    except ExternalToolError as exc:
        raise ExternalToolError(f"{what}: {exc}") from exc
    if res.returncode not in (0, 2, 3):
        _raise(what, res.returncode, res.err)
    try:
        data = json.loads(res.out)
        return CheckResult(
            corruptions=int(data.get("corruptions", 0)), leaks=int(data.get("leaks", 0)), raw=data
        )
    except (ValueError, TypeError, AttributeError) as exc:
        raise ExternalToolError(f"{what}: unexpected output") from exc


# -- compare -----------------------------------------------------------------------


def compare(a: str | os.PathLike[str], b: str | os.PathLike[str], *, fmt_a: str,
            fmt_b: str) -> bool:
    """``qemu-img compare``: True when both images read the same (sizes may differ
    only by zeroes), False when they differ; an error (exit 2+) raises."""
    what = f"qemu-img compare {os.fspath(a)} {os.fspath(b)}"
    try:
        res = proc.run(
            [QEMU_IMG, "compare", "-q", "-f", fmt_a, "-F", fmt_b, os.fspath(a), os.fspath(b)]
        )
    except ExternalToolError as exc:
        raise ExternalToolError(f"{what}: {exc}") from exc
    if res.returncode in (0, 1):
        return res.returncode == 0
    _raise(what, res.returncode, res.err)
    return False  # not reached: _raise raises


# -- convert -----------------------------------------------------------------------

_PROGRESS = re.compile(rb"\((\d+(?:\.\d+)?)/100%\)")


def convert(
    source: str,
    target: str | os.PathLike[str],
    *,
    source_fmt: str,
    target_fmt: str,
    target_exists: bool = False,
    target_is_zero: bool = False,
    progress: Callable[[float], None] | None = None,
    rate_limit: int | None = None,
) -> None:
    """``qemu-img convert`` ``source`` into ``target``, both formats explicit.

    :param target_exists: write into the existing ``target`` (``-n``).
    :param target_is_zero: the target reads as zeroes (``--target-is-zero``, with
        ``-n`` only): zero areas are skipped.
    :param progress: called with each percentage qemu-img prints (``-p``, about
        one call per percent), and 100 at the end. An exception from it (a signal
        turned into one) stops qemu-img before it propagates.
    :param rate_limit: bytes per second (``-r``), None: unlimited.
    """
    args = [QEMU_IMG, "convert", "-p"]
    if target_exists:
        args.append("-n")
    if target_is_zero:
        args.append("--target-is-zero")
    if rate_limit is not None:
        if rate_limit <= 0:
            raise ValueError(f"rate limit must be positive, not {rate_limit}")
        args += ["-r", str(rate_limit)]
    args += ["-f", source_fmt, source, "-O", target_fmt, os.fspath(target)]
    what = f"qemu-img convert {source} -> {os.fspath(target)}"
    with tempfile.TemporaryFile() as errors:
        child = proc.spawn(args, stdout=subprocess.PIPE, stderr=errors)
        stdout = child.stdout
        assert stdout is not None
        try:
            while chunk := os.read(stdout.fileno(), 4096):  # "\r"-separated, unbuffered
                found = _PROGRESS.findall(chunk)
                if found and progress is not None:
                    progress(float(found[-1]))
            child.wait()
        except BaseException:
            child.stop(0)  # SIGTERM or a failed callback: never leave qemu-img behind
            raise
        returncode = child.stop()
        if returncode != 0:
            errors.seek(0)
            _raise(what, returncode, errors.read().decode(errors="replace").strip())
    if progress is not None:
        progress(100.0)


def throttled(
    report: Callable[[float], None], interval: float, clock: Callable[[], float] = time.monotonic
) -> Callable[[float], None]:
    """A ``progress`` callback passing on at most one value per ``interval`` seconds
    (and 100 once: qemu-img prints it more than once, then the caller's end)."""
    next_at = clock() + interval
    finished = False

    def call(percent: float) -> None:
        nonlocal next_at, finished
        if finished:
            return
        if percent >= 100.0 or clock() >= next_at:
            next_at = clock() + interval
            finished = percent >= 100.0
            report(percent)

    return call
