"""Small state files a provider keeps on the host, outside the backup storage.

What a provider must be able to trust about its storage cannot live in that
storage: a rolled-back or edited storage would vouch for itself. The incremental
base proof (the checksum of the last committed snapshot's manifest, like the one
QEMU keeps for Proxmox Backup Server) lives here, one JSON file per (provider
type, storage id, guest)::

    <state dir>/<provider type>/<storage id>/<name>.json     mode 0600, dirs 0700

The state dir is ``/var/lib/pvebackup`` (where a Proxmox VE provider would keep
it) unless the environment variable ``PVEBACKUP_STATE_DIR`` names another one:
the CLI sets it from ``--root`` (``<root>/var/lib/pvebackup``), so that a test
node keeps its state inside its root. Providers are made through the seed's
``new_backup_provider(scfg, storeid, log_function)``, which has no place for
it; an environment variable reaches third-party providers too (they call
:func:`default_state_dir`). Our providers also take ``state_dir=`` directly.

Files are replaced atomically (:func:`pvebackup.kit.safefs.atomic_write_path`:
temporary file, fsync, rename, fsync of the directory). A file that is missing,
unreadable, too big or not a JSON object is reported as such (:class:`Loaded`),
never raised: the caller falls back to the safe choice (a full backup) and logs why.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from pvebackup.api.errors import StateError, UnsafeStorageError
from pvebackup.kit import safefs

__all__ = [
    "DEFAULT_STATE_DIR",
    "STATE_DIR_ENV",
    "HostState",
    "Loaded",
    "default_state_dir",
]

STATE_DIR_ENV: Final = "PVEBACKUP_STATE_DIR"
DEFAULT_STATE_DIR: Final = Path("/var/lib/pvebackup")
_MAX_SIZE: Final = 64 * 1024
_PART_OK: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def default_state_dir() -> Path:
    """``$PVEBACKUP_STATE_DIR`` if set (and not empty), else ``/var/lib/pvebackup``."""
    value = os.environ.get(STATE_DIR_ENV)
    return Path(value) if value else DEFAULT_STATE_DIR


def _part(text: str) -> str:
    # Storage ids come from storage.cfg (node config), but a file name must never
    # climb out of its directory whatever they hold.
    if _PART_OK.fullmatch(text) and text not in (".", ".."):
        return text
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    return re.sub(r"[^A-Za-z0-9_.-]", "_", text)[:40].lstrip(".") + "_" + digest


@dataclass(frozen=True, slots=True)
class Loaded:
    """A state file as read: ``doc`` (``None``: no usable file) and why not."""

    doc: Mapping[str, Any] | None
    problem: str | None = None
    """``None`` with ``doc`` set, or with no file at all; else what is wrong."""

    @property
    def missing(self) -> bool:
        return self.doc is None and self.problem is None


class HostState:
    """The state files of one (provider type, storage id)."""

    def __init__(self, provider: str, storeid: str, state_dir: Path | str | None = None):
        base = Path(state_dir) if state_dir is not None else default_state_dir()
        self.dir = base / _part(provider) / _part(storeid)

    def path(self, name: str) -> Path:
        return self.dir / f"{_part(name)}.json"

    def read(self, name: str) -> Loaded:
        """The state ``name``; a damaged one is reported, never raised."""
        path = self.path(name)
        try:
            # A symlink at the file is refused, a fifo cannot hang us (safefs).
            with safefs.owned_fd(safefs.open_file_path(path, follow_symlinks=False)) as fd:
                data = safefs.read_fd(fd, limit=_MAX_SIZE, name=str(path))
        except FileNotFoundError:
            return Loaded(None)
        except (UnsafeStorageError, IsADirectoryError):
            return Loaded(None, f"state file {path} is not a regular file")
        except OSError as exc:
            if exc.errno == errno.EFBIG:
                return Loaded(None, f"state file {path} is too big")
            return Loaded(None, f"state file {path} cannot be read: {exc.strerror}")
        try:
            doc = json.loads(data)
        except (ValueError, UnicodeDecodeError):
            return Loaded(None, f"state file {path} is damaged (not JSON)")
        if not isinstance(doc, dict):
            return Loaded(None, f"state file {path} is damaged (not an object)")
        return Loaded(doc)

    def write(self, name: str, doc: Mapping[str, Any]) -> None:
        """Replace the state ``name`` durably (0600 file in a 0700 directory).

        :raises StateError: the file cannot be written (the caller's step fails:
            a proof that cannot be kept must not be assumed).
        """
        try:
            self._make_dirs()
            data = json.dumps(dict(doc), sort_keys=True).encode() + b"\n"
            safefs.atomic_write_path(self.path(name), data, mode=0o600)
        except OSError as exc:
            raise StateError(
                f"cannot write the host state file {self.path(name)}: {exc.strerror or exc}"
            ) from exc

    def remove(self, name: str) -> None:
        """Delete the state ``name`` (missing is fine); ``StateError`` if that fails."""
        try:
            os.unlink(self.path(name))
            _fsync_dir(self.dir)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise StateError(
                f"cannot remove the host state file {self.path(name)}: {exc.strerror or exc}"
            ) from exc

    def _make_dirs(self) -> None:
        os.makedirs(self.dir.parent.parent, mode=0o700, exist_ok=True)
        for d in (self.dir.parent, self.dir):
            try:
                os.mkdir(d, 0o700)
            except FileExistsError:
                pass
            # Our own two levels are private whatever the umask was (the top one may
            # be a directory the admin chose and shares).
            st = os.lstat(d)
            if not stat.S_ISDIR(st.st_mode):
                raise NotADirectoryError(errno.ENOTDIR, "not a directory", str(d))
            if stat.S_IMODE(st.st_mode) != 0o700:
                os.chmod(d, 0o700)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
