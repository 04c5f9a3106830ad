"""The unchanging view of a container's file system that ``backup_directory`` gets.

Two ways, as vzdump has them:

- **Stopped container** (``running=False``): bind mounts, no copying. The root
  file system is bind-mounted at ``workdir/root`` and made a *private* mount, so
  that nothing mounted below it propagates back to the host's copy of the rootfs;
  each mount point's host directory is bind-mounted (also made private) at its
  container path inside it, parents before children; at the end every mount is
  remounted read-only. A mount point directory missing in the rootfs is created
  there first (the bind mount shows the real rootfs; Proxmox VE creates missing
  mount point directories in the rootfs the same way), owned like its parent.
- **Running container** (``running=True``): a copy, like vzdump's suspend mode,
  made with ``rsync -aHAX --numeric-ids`` (owners, modes, times, symlinks, hard
  links, devices, fifos, xattrs, ACLs) into ``workdir/copy``, each mount point
  copied into its place; what a mount point hides in the rootfs (or in the mount
  point above it) is left out. The copy is removed at the end.

Mount point paths are walked one component at a time with ``O_NOFOLLOW`` and the
mount or copy targets the opened directory through ``/proc/self/fd``: a symlink
inside the container (``/srv -> /etc``) can never redirect a mount or a copy onto
the host. Such a path is refused with :class:`UnsafeArchiveError`.

Everything is undone on exit, also when the body raises: mounts in reverse order,
the copy removed.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import shutil
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path

from pvebackup.api.errors import (
    ExternalToolError,
    UnsafeArchiveError,
    UnsafeStorageError,
)
from pvebackup.host.lxc.writer import split_name
from pvebackup.kit import proc, safefs
from pvebackup.kit.oserrors import os_error

__all__ = ["backup_sources", "prepare_backup_directory"]

_MS_RDONLY = 0x1
_MS_REMOUNT = 0x20
_MS_BIND = 0x1000
_MS_PRIVATE = 0x40000
_MNT_DETACH = 0x2
_UMOUNT_NOFOLLOW = 0x8
_RSYNC_VANISHED = 24

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_ulong,
    ctypes.c_void_p,
]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


def _mount(source: str | None, target: str, flags: int) -> None:
    src = source.encode() if source is not None else None
    if _libc.mount(src, target.encode(), None, flags, None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), target)


def _umount(target: str) -> None:
    if _libc.umount2(target.encode(), _UMOUNT_NOFOLLOW) == 0:
        return
    err = ctypes.get_errno()
    if err == errno.EBUSY and _libc.umount2(target.encode(), _MNT_DETACH) == 0:
        return
    err = ctypes.get_errno()
    raise OSError(err, os.strerror(err), target)


def _umount_all(mounted: list[str]) -> None:
    """Unmount in reverse order; try every one, then raise the first failure."""
    failure: OSError | None = None
    for target in reversed(mounted):
        try:
            _umount(target)
        except OSError as exc:
            failure = failure or exc
    if failure is not None:
        raise failure


def _mountpoint_parts(ct_path: str) -> tuple[str, ...]:
    if not ct_path.startswith("/"):
        raise ValueError(f"mount point path must be absolute: {ct_path!r}")
    parts = split_name(ct_path.lstrip("/"))
    if not parts:
        raise ValueError("the root file system is not a mount point")
    return parts


def backup_sources(mountpoints: Sequence[tuple[str, Path]]) -> list[str]:
    """The seed's ``$sources``: ``"."`` and ``"./srv/data"`` per mount point, config order."""
    return ["."] + ["./" + "/".join(_mountpoint_parts(ct)) for ct, _host in mountpoints]


def _open_target(root: Path, parts: tuple[str, ...]) -> int:
    """Open (creating if missing) directory ``parts`` below ``root``, no symlinks."""

    def like_parent(parent_fd: int, name: str) -> None:
        # Owned like its parent, as Proxmox VE creates it when the container starts.
        parent = os.fstat(parent_fd)
        os.chown(name, parent.st_uid, parent.st_gid, dir_fd=parent_fd, follow_symlinks=False)

    with safefs.owned_fd(os.open(root, safefs.DIR_FLAGS)) as root_fd:
        try:
            return safefs.open_dir(root_fd, parts, create=True, on_create=like_parent)
        except (UnsafeStorageError, NotADirectoryError) as exc:
            raise UnsafeArchiveError(
                f"mount point /{'/'.join(parts)}: a component is a symlink or not a "
                f"directory inside the container ({exc})"
            ) from exc


def _ordered(mountpoints: Sequence[tuple[str, Path]]) -> list[tuple[tuple[str, ...], Path]]:
    # Parents before children, whatever the config order.
    return sorted(((_mountpoint_parts(ct), Path(host)) for ct, host in mountpoints))


@contextmanager
def _bind_view(
    rootfs: Path, mountpoints: Sequence[tuple[str, Path]], workdir: Path
) -> Iterator[Path]:
    staging = workdir / "root"
    staging.mkdir(mode=0o700)
    with ExitStack() as stack:
        stack.callback(staging.rmdir)
        mounted: list[str] = []
        stack.callback(_umount_all, mounted)
        _mount(str(rootfs), str(staging), _MS_BIND)
        mounted.append(str(staging))
        _mount(None, str(staging), _MS_PRIVATE)
        for parts, host_dir in _ordered(mountpoints):
            fd = _open_target(staging, parts)
            try:
                _mount(str(host_dir), f"/proc/self/fd/{fd}", _MS_BIND)
            finally:
                os.close(fd)
            target = str(staging.joinpath(*parts))
            mounted.append(target)
            _mount(None, target, _MS_PRIVATE)
        for target in mounted:
            _mount(None, target, _MS_REMOUNT | _MS_BIND | _MS_RDONLY)
        yield staging


def _hidden_below(parts: tuple[str, ...], all_parts: list[tuple[str, ...]]) -> list[str]:
    """rsync excludes for what mount points below ``parts`` hide in its source."""
    excludes = []
    for other in all_parts:
        if len(other) > len(parts) and other[: len(parts)] == parts:
            rel = "/".join(re.sub(r"([*?\[\\])", r"\\\1", c) for c in other[len(parts) :])
            excludes.append(f"--exclude=/{rel}/*")
    return excludes


def _rsync(source: Path, dest: str, excludes: list[str], pass_fds: tuple[int, ...] = ()) -> None:
    # --modify-window=-1: compare nanoseconds, or rsync leaves a directory time
    # alone when it differs from the source only below one second.
    cmd = ["rsync", "-aHAX", "--numeric-ids", "--one-file-system", "--modify-window=-1"]
    cmd += excludes
    cmd += [f"{source}/", f"{dest}/"]
    res = proc.run(cmd, pass_fds=pass_fds)
    # 24: files vanished while copying, expected from a running container.
    if res.returncode not in (0, _RSYNC_VANISHED):
        raise ExternalToolError(
            f"rsync of {source} failed (exit {res.returncode}): {res.err[-500:]}"
        )


@contextmanager
def _copy_view(
    rootfs: Path, mountpoints: Sequence[tuple[str, Path]], workdir: Path
) -> Iterator[Path]:
    copy = workdir / "copy"
    copy.mkdir(mode=0o700)
    ordered = _ordered(mountpoints)
    all_parts = [parts for parts, _host in ordered]
    try:
        _rsync(rootfs, str(copy), _hidden_below((), all_parts))
        for parts, host_dir in ordered:
            fd = _open_target(copy, parts)
            try:
                excludes = _hidden_below(parts, all_parts)
                _rsync(host_dir, f"/proc/self/fd/{fd}", excludes, pass_fds=(fd,))
            finally:
                os.close(fd)
        yield copy
    finally:
        shutil.rmtree(copy)


@contextmanager
def prepare_backup_directory(
    rootfs: Path,
    mountpoints: Sequence[tuple[str, Path]],
    *,
    running: bool,
    workdir: Path,
) -> Iterator[Path]:
    """Yield a directory showing the container's file system, unchanging meanwhile.

    ``rootfs`` is the host directory of the root file system; ``mountpoints``
    are ``(container path, host directory)`` pairs such as ``("/srv/data",
    Path("/var/lib/vz/images/100/subvol-100-disk-1"))``. ``workdir`` is an
    existing, empty, private directory of the host's; the view is made inside it.
    Bind mounts for a stopped container, a copy for a running one (see the
    module doc). Raises :class:`UnsafeArchiveError` for a mount point path going
    through a symlink, :class:`ExternalToolError` when rsync fails,
    :class:`PveBackupError` when mounting fails.
    """
    view = _copy_view if running else _bind_view
    try:
        cm = view(rootfs, mountpoints, workdir)
        path = cm.__enter__()
    except OSError as exc:
        raise os_error(exc, "cannot prepare the container directory") from exc
    try:
        yield path
    except BaseException as exc:
        if not cm.__exit__(type(exc), exc, exc.__traceback__):
            raise
    else:
        try:
            cm.__exit__(None, None, None)
        except OSError as exc:
            raise os_error(exc, "cannot remove the container directory") from exc
