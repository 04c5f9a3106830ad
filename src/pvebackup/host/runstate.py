"""One guest's run on this node: the per-guest lock and what the run has made.

Under ``<root>/run/pvebackup`` (a tmpfs on a real node: a reboot clears it, which is
right, since the processes and mounts it names are gone then too)::

    lock/<vmid>.lock     flock held for the whole backup or restore of the guest;
                         holds "PID start-time command" of the holder
    state/<vmid>.json    what the holder has started or made and not yet removed:
                         children (PID, kernel start time, program, run dir),
                         private directories, volumes it is about to allocate,
                         a live restore's config written but not yet committed

A second backup or restore of the same guest fails at once with
:class:`LockedError` (exit 7, "locked by PID N"). The kernel drops the flock when
the holder dies, also by SIGKILL; the state file then stays. Whoever takes the lock
next and finds a state file knows its writer is dead, and removes what it names
(:meth:`GuestRun.recover`), logging each removal at warn: a child still running
is SIGKILLed only if ``/proc/PID`` still shows the same start time and program;
mounts below a recorded directory are detached (deepest first); the directories
are removed, but never while a mount remains below one; a recorded volume is
freed unless the guest's current config uses it (an uncommitted live restore
config is removed first, after its VM was killed). On a normal exit (also after an
exception or SIGTERM) every resource was removed by its own ``finally`` block,
and the state file goes.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any

from pvebackup.api.errors import PveBackupError, StateError
from pvebackup.api.types import GuestType, LogFunction, LogLevel
from pvebackup.host.guests import CtConfig, NodeRoot, VmConfig
from pvebackup.host.qemu.live import remove_leftovers
from pvebackup.kit import safefs
from pvebackup.kit.lock import FileLock
from pvebackup.kit.oserrors import os_error
from pvebackup.kit.proc import ChildInfo, kill_verified, observe_children, process_start_time
from pvebackup.storage import (
    GuestVolumeStorage,
    StorageConfig,
    lookup,
    parse_volume_id,
    storage_config,
)

__all__ = ["GuestRun", "mounts_below"]

_MNT_DETACH = 0x2
_UMOUNT_NOFOLLOW = 0x8
_STATE_MAX = 1 << 20
# A run records a few children, directories and volumes: a few KiB.
_libc = ctypes.CDLL(None, use_errno=True)
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo.
    out, i = [], 0
    while i < len(field):
        code = field[i + 1 : i + 4]
        if field[i] == "\\" and len(code) == 3 and code.isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mounts_below(path: Path, mountinfo: str = "/proc/self/mountinfo") -> list[str]:
    """Mount points at or below ``path``, deepest (last mounted) first.

    ``path`` is resolved first: mountinfo names mount points by their real path,
    and a symlink on the way (``/tmp`` -> ``/var/tmp``) must not hide a mount.
    """
    prefix = os.path.realpath(path).rstrip("/")
    found: list[str] = []
    try:
        with open(mountinfo, encoding="utf-8", errors="surrogateescape") as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    for line in lines:
        fields = line.split(" ")
        if len(fields) < 5:
            continue
        target = _unescape(fields[4])
        if target == prefix or target.startswith(prefix + "/"):
            found.append(target)
    return list(reversed(found))


def _detach(target: str) -> None:
    if _libc.umount2(target.encode(errors="surrogateescape"), _MNT_DETACH | _UMOUNT_NOFOLLOW):
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), target)


class GuestRun:
    """The lock and the run state of one guest's backup or restore; a context manager.

    ``__enter__`` takes the lock (:class:`LockedError` at once if held), cleans up
    after a dead earlier holder and starts a fresh state file; :meth:`recording`
    records every child and private directory made meanwhile
    (:func:`pvebackup.kit.proc.observe_children`). ``__exit__`` removes the state
    file and drops the lock.

    :param cfg: storage.cfg, to free volumes a dead restore allocated (None: skip).
    """

    def __init__(
        self,
        root: NodeRoot,
        vmid: int,
        *,
        action: str,
        log: LogFunction,
        cfg: StorageConfig | None = None,
    ) -> None:
        self.root = root
        self.vmid = vmid
        self.action = action
        self.cfg = cfg
        self._log = log
        self.lock_path = root.run_dir / "lock" / f"{vmid}.lock"
        self.state_path = root.run_dir / "state" / f"{vmid}.json"
        self._lock = FileLock(self.lock_path, what=f"guest {vmid}")
        self._state: dict[str, Any] = {}
        self._mutex = threading.Lock()  # observers may be told from any thread

    # -- life cycle ---------------------------------------------------------------

    def __enter__(self) -> GuestRun:
        self._lock.acquire()
        try:
            self.recover()
            start = process_start_time(os.getpid())
            self._state = {
                "pid": os.getpid(),
                "start_time": start,
                "action": self.action,
                "children": [],
                "dirs": [],
                "volumes": [],
                "configs": [],
            }
            self._save()
        except BaseException:
            self._lock.release()
            raise
        return self

    @contextmanager
    def recording(self) -> Iterator[GuestRun]:
        """Within the block, record every child and private directory made."""
        with observe_children(self):
            yield self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            # Every resource had its own finally block; nothing is left to record.
            self.state_path.unlink(missing_ok=True)
        finally:
            self._lock.release()

    # -- recording (ChildObserver) --------------------------------------------------

    def child_started(self, info: ChildInfo) -> None:
        with self._mutex:
            self._state["children"].append(
                {"pid": info.pid, "start_time": info.start_time, "program": info.program,
                 "run_dir": info.run_dir}
            )  # fmt: skip
            self._save()

    def child_ended(self, info: ChildInfo) -> None:
        with self._mutex:
            kids = self._state["children"]
            key = (info.pid, info.start_time)
            kids[:] = [c for c in kids if (c["pid"], c["start_time"]) != key]
            if info.run_dir is not None and info.run_dir in self._state["dirs"]:
                self._state["dirs"].remove(info.run_dir)
            self._save()

    def dir_planned(self, path: str) -> None:
        with self._mutex:
            self._state["dirs"].append(path)
            self._save()

    def add_volume(self, volid: str) -> None:
        """Record ``volid`` *before* it is allocated: a dead run's orphan is found."""
        with self._mutex:
            self._state["volumes"].append(volid)
            self._save()

    def set_live(self, record: dict[str, Any] | None) -> None:
        """Record what a live backup put into the running VM (None: nothing now)."""
        with self._mutex:
            if record is None:
                self._state.pop("qemu_live", None)
            else:
                self._state["qemu_live"] = record
            self._save()

    def add_config(self, path: Path) -> None:
        """Record a config about to be written that is not the commit point yet (a
        live restore's: its VM runs before its disks are complete)."""
        with self._mutex:
            self._state["configs"].append(str(path))
            self._save()

    def drop_config(self, path: Path) -> None:
        """The config recorded by :meth:`add_config` is committed (or gone)."""
        with self._mutex:
            if str(path) in self._state["configs"]:
                self._state["configs"].remove(str(path))
            self._save()

    def _save(self) -> None:
        self.state_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        # Not durable: the state lives on a tmpfs that a reboot clears together with
        # the processes and mounts it names; atomic, so recover() never sees half.
        safefs.atomic_write_path(
            self.state_path, json.dumps(self._state).encode("utf-8"), mode=0o600, durable=False
        )

    # -- recovery --------------------------------------------------------------------

    def recover(self) -> None:
        """Remove what a dead holder of the lock left (we hold the lock)."""
        try:
            data = safefs.read_file_path(
                self.state_path, limit=_STATE_MAX, follow_symlinks=False
            )
        except FileNotFoundError:
            return
        except OSError as exc:
            raise os_error(exc, f"cannot read run state {self.state_path}") from exc
        try:
            old = json.loads(data.decode("utf-8"))
            if not isinstance(old, dict):
                raise ValueError("not an object")
        except ValueError:
            self._warn(f"run state {self.state_path} unreadable; removed")
            self.state_path.unlink(missing_ok=True)
            return
        self._warn(
            f"guest {self.vmid}: an earlier {old.get('action', 'run')} (PID {old.get('pid')})"
            " ended without cleaning up; removing what it left"
        )
        failed = False
        live = old.get("qemu_live")
        if isinstance(live, dict):
            # First: the VM runs on with our filter above its disk until this is done.
            failed |= not remove_leftovers(live, vm_pid=self.root.vm_pid(self.vmid), log=self._log)
        for child in _records(old.get("children")):
            try:
                pid, start, program = int(child["pid"]), int(child["start_time"]), child["program"]
            except (KeyError, TypeError, ValueError):
                continue
            if kill_verified(pid, start, str(program)):
                self._warn(f"killed {program} (PID {pid}) left running by the earlier run")
            run_dir = child.get("run_dir")
            if isinstance(run_dir, str):
                failed |= not self._remove_dir(Path(run_dir))
        for path in _strings(old.get("dirs")):
            failed |= not self._remove_dir(Path(path))
        for path in _strings(old.get("configs")):
            failed |= not self._remove_config(Path(path))
        for volid in _strings(old.get("volumes")):
            failed |= not self._free_orphan(volid)
        if failed:
            raise StateError(
                f"guest {self.vmid}: could not remove everything an earlier run left"
                f" (see the warnings; state kept in {self.state_path})"
            )
        self.state_path.unlink(missing_ok=True)

    def _warn(self, message: str) -> None:
        self._log(LogLevel.WARN, message)

    def _remove_dir(self, path: Path) -> bool:
        if not path.is_absolute() or not os.path.lexists(path):
            return True
        for target in mounts_below(path):
            try:
                _detach(target)
                self._warn(f"unmounted {target} left by the earlier run")
            except OSError as exc:
                self._warn(f"cannot unmount {target}: {exc.strerror}")
        if mounts_below(path):
            # Never remove files through a mount: they would be the guest's own.
            self._warn(f"not removing {path}: something is still mounted below it")
            return False
        return self._remove(path, f"{path} left by the earlier run")

    def _remove_config(self, path: Path) -> bool:
        # Only this guest's own config path: whatever else a state file names is
        # left alone.
        if path not in {self.root.config_path(self.vmid, t) for t in GuestType}:
            self._warn(f"not removing {path}: not a config of guest {self.vmid}")
            return True
        return self._remove(path, f"config {path} of an unfinished live restore")

    def _remove(self, path: Path, what: str) -> bool:
        """Remove ``path`` (a real directory with its content, else the entry itself;
        a symlink is never followed) and warn ``removed <what>``. False if it stays."""
        try:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        except FileNotFoundError:
            return True
        except OSError as exc:
            self._warn(f"cannot remove {path}: {exc.strerror}")
            return False
        self._warn(f"removed {what}")
        return True

    def _free_orphan(self, volid: str) -> bool:
        if self.cfg is None:
            return True
        if volid in self._referenced():
            return True  # the restore got as far as writing the config
        try:
            storeid, volname = parse_volume_id(volid)
            scfg = storage_config(self.cfg, storeid)
            plugin = lookup(scfg["type"])
            if not isinstance(plugin, GuestVolumeStorage):
                return True
            if not plugin.volume_exists(scfg, storeid, volname):
                return True
            plugin.free(scfg, storeid, volname)
        except PveBackupError as exc:
            self._warn(f"cannot free orphan volume {volid}: {exc}")
            return False
        except OSError as exc:
            self._warn(f"cannot free orphan volume {volid}: {exc.strerror}")
            return False
        self._warn(f"freed volume {volid} allocated by the earlier run")
        return True

    def _referenced(self) -> set[str]:
        vmtype = self.root.guest_type(self.vmid)
        if vmtype is None:
            return set()
        config = self.root.load_guest(self.vmid, vmtype)
        assert isinstance(config, VmConfig | CtConfig)
        return set(config.volume_ids())


def _records(value: object) -> Iterator[dict[str, Any]]:
    if isinstance(value, list):
        yield from (v for v in value if isinstance(v, dict))


def _strings(value: object) -> Iterator[str]:
    if isinstance(value, list):
        yield from (v for v in value if isinstance(v, str))
