"""The restore helper: writes a container's files as root of its user namespace.

Started by :func:`pvebackup.host.lxc.userns.restore_in_userns` as ``python -m
pvebackup.host.lxc.nschild CONFIG`` (see that module for the protocol and the
why). It reads a tar stream on stdin and writes it with
:class:`~pvebackup.host.lxc.writer.SafeTreeWriter` into the target directories it
inherited as descriptors. Everything it needs is imported before it leaves host
root: afterwards it may not be able to read the host's files.
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import signal
import stat
import sys
import traceback
from typing import Any

from pvebackup.api.errors import ExternalToolError, IntegrityError, PveBackupError
from pvebackup.api.types import IdMapEntry
from pvebackup.host.lxc.tarstream import restore_tar_stream
from pvebackup.host.lxc.writer import SafeTreeWriter

__all__ = ["MEMORY_LIMIT", "main"]

MEMORY_LIMIT = 1 << 30
"""Address space of the helper. Parsing is bounded (see tarstream); this is the
backstop against what we did not think of, turned into an error, not into the
OOM killer's choice of a process."""

_CLONE_NEWUSER = 0x10000000
_PR_SET_PDEATHSIG = 1
_MAX_TEXT = 4000

_libc = ctypes.CDLL(None, use_errno=True)
_libc.unshare.argtypes = [ctypes.c_int]
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                        ctypes.c_ulong]


def _die_with_parent(parent: int) -> None:
    # The kernel clears this on every change of credentials, so it is asked for
    # again after becoming the namespace's root. A parent that died before the
    # request shows as a different parent pid.
    if _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0 or os.getppid() != parent:
        os._exit(1)


class _Messages:
    def __init__(self, fd: int) -> None:
        self._out = os.fdopen(fd, "w", encoding="utf-8")

    def send(self, event: str, **fields: Any) -> None:
        self._out.write(json.dumps({"event": event, **fields}) + "\n")
        self._out.flush()

    def log(self, level: str, text: str) -> None:
        self.send("log", level=level, msg=text[:_MAX_TEXT])

    def error(self, exc: PveBackupError) -> None:
        self.send("error", type=type(exc).__name__, msg=str(exc)[:_MAX_TEXT])


def _become_namespace_root() -> None:
    os.setgroups([])  # host root's supplementary groups must not come along
    os.setresgid(0, 0, 0)
    os.setresuid(0, 0, 0)


def _drain(fd: int) -> None:
    # The host's tar writer pads the stream after the end marker; read it, so
    # that the host never sees a broken pipe from a helper that succeeded.
    if stat.S_ISFIFO(os.fstat(fd).st_mode):
        while os.read(fd, 1 << 16):
            pass


def main(argv: list[str]) -> int:
    config = json.loads(argv[1])
    parent = int(config["parent"])
    _die_with_parent(parent)
    messages = _Messages(int(config["msg_fd"]))
    label = str(config["label"])
    if _libc.unshare(_CLONE_NEWUSER) != 0:
        err = ctypes.get_errno()
        messages.error(ExternalToolError(f"cannot make a user namespace: {os.strerror(err)}"))
        return 1
    messages.send("unshared")
    go_fd = int(config["go_fd"])
    go = os.read(go_fd, 1)
    os.close(go_fd)
    if go != b"g":
        return 1  # the host could not set the map and gave up
    _become_namespace_root()
    _die_with_parent(parent)
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    targets: dict[str, int] = {k: int(v) for k, v in config["targets"].items()}
    id_map = [IdMapEntry(k, int(c), int(h), int(n)) for k, c, h, n in config["id_map"]]
    try:
        with os.fdopen(0, "rb", closefd=False) as stdin, SafeTreeWriter(
            targets, id_map, messages.log
        ) as writer:
            count = restore_tar_stream(stdin, writer, messages.log, label=label)
            _drain(0)
    except PveBackupError as exc:
        messages.error(exc)
        return 1
    except MemoryError:
        messages.error(
            IntegrityError(f"{label}: restoring it needs more than {MEMORY_LIMIT >> 20} MiB")
        )
        return 1
    except Exception as exc:
        traceback.print_exc()
        messages.error(ExternalToolError(f"restore helper failed: {exc!r}"))
        return 1
    messages.send("done", count=count)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
