"""Restore an unprivileged container inside its own user namespace (the host side).

Restoring as host root and mapping ids by hand trusts the archive with host root's
powers: a crafted archive made a v2 (host-wide) ``security.capability`` and a
world-writable block device for a host disk. Like Proxmox VE (``lxc-usernsexec``
around ``tar``), the files are therefore written by a helper process,
:mod:`pvebackup.host.lxc.nschild`, that runs as root of a user namespace with the
target container's id map, so that the kernel refuses whatever the container's
own root could not do: device nodes, ``trusted.*`` xattrs, owners outside the
map; and a file capability is stored as v3, valid only below the container's root.

How the namespace is made (tried on Debian 12): util-linux 2.38's ``unshare
--map-users`` takes one range per option and needs ``newuidmap`` (package
``uidmap``, not installed on a PVE node by default), and Python 3.11 has no
``os.unshare``. So the helper calls ``unshare(CLONE_NEWUSER)`` itself (ctypes),
says so on its message pipe and waits; the host, as root of the initial
namespace, writes ``/proc/PID/uid_map`` and ``gid_map`` (any number of ranges,
no helper binary) and lets it go on. The helper then becomes the namespace's
root (``setresuid(0)``, no supplementary groups) and, since a credential change
clears it, asks again to be killed when its parent dies.

The host opens the target directories (the helper needs no path on the host),
makes the container's root their owner, and hands the helper the restore source
as a tar stream on its stdin: the archive's own descriptor, or, for the directory
mechanism, a PAX stream the host makes from a symlink-safe walk of the provider's
directory. The helper parses all of it; parsing hostile input therefore also runs
with the container root's powers only, under a memory limit.

The helper reports on a pipe, one JSON object per line: ``unshared``; ``log``
(forwarded to the log function); ``done`` with the entry count; or ``error`` with
the name of a :mod:`pvebackup.api.errors` class, raised here again so that the
exit code is the same as for an in-process restore.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any, BinaryIO

from pvebackup.api import errors
from pvebackup.api.errors import ExternalToolError, GuestConfigError, PveBackupError
from pvebackup.api.idmap import IdMapper
from pvebackup.api.types import IdMapEntry, LogFunction
from pvebackup.kit.oserrors import os_error
from pvebackup.kit.proc import Child, spawn

__all__ = ["CHILD_MODULE", "Feed", "restore_in_userns"]

CHILD_MODULE = "pvebackup.host.lxc.nschild"

Feed = Callable[[BinaryIO, Callable[[], None]], None]
"""Writes the tar stream to the helper; calls its second argument now and then."""

_HANDSHAKE_SECONDS = 60.0
_MAX_MESSAGE = 1 << 16
_MAX_MAP_LINES = 340  # the kernel's limit per map since Linux 4.15
_SRC_DIR = Path(__file__).resolve().parents[3]


def _root_ids(id_map: Sequence[IdMapEntry]) -> tuple[int, int]:
    """The host uid and gid of the container's root; the map is checked on the way."""
    try:
        mapper = IdMapper(id_map)
        return mapper.ct_to_host_uid(0), mapper.ct_to_host_gid(0)
    except ValueError as exc:
        raise GuestConfigError(f"unusable id map for the restore: {exc}") from exc


def _map_text(id_map: Sequence[IdMapEntry], kind: str) -> bytes:
    lines = [
        f"{e.ct_start} {e.host_start} {e.count}\n"
        for e in sorted(id_map, key=lambda e: e.ct_start)
        if e.kind == kind
    ]
    if len(lines) > _MAX_MAP_LINES:
        raise GuestConfigError(f"id map has more than {_MAX_MAP_LINES} {kind} ranges")
    return "".join(lines).encode("ascii")


def _write_maps(pid: int, id_map: Sequence[IdMapEntry]) -> None:
    for kind, name in (("u", "uid_map"), ("g", "gid_map")):
        fd = os.open(f"/proc/{pid}/{name}", os.O_WRONLY | os.O_CLOEXEC)
        try:
            # The kernel takes the whole map in one write, and only once.
            os.write(fd, _map_text(id_map, kind))
        finally:
            os.close(fd)


def _error_class(name: object) -> type[PveBackupError]:
    # Only our own error classes: the helper parsed hostile input, so its
    # messages are read as data, never as code to look up freely.
    cls = getattr(errors, name, None) if isinstance(name, str) else None
    if isinstance(cls, type) and issubclass(cls, PveBackupError) and cls is not PveBackupError:
        return cls
    return ExternalToolError  # the helper failed in a way it could not name


def _read_messages(stream: IO[bytes], out: queue.Queue[dict[str, Any] | None]) -> None:
    try:
        while line := stream.readline(_MAX_MESSAGE):
            try:
                msg = json.loads(line)
            except ValueError:
                msg = None
            if not isinstance(msg, dict):
                msg = {"event": "bad", "msg": repr(line[:200])}
            out.put(msg)
    except (OSError, ValueError):
        pass  # closed under us: the host is tearing the helper down
    finally:
        out.put(None)


class _Relay:
    """Acts on the helper's messages: logs, the result, the error."""

    def __init__(self, log: LogFunction) -> None:
        self.log = log
        self.count: int | None = None
        self.error: PveBackupError | None = None
        self.ended = False

    def handle(self, msg: dict[str, Any] | None) -> None:
        if msg is None:
            self.ended = True
            return
        event = msg.get("event")
        text = str(msg.get("msg", ""))[:_MAX_MESSAGE]
        if event == "log":
            level = msg.get("level")
            self.log(level if level in ("info", "warn", "err") else "warn", text)
        elif event == "done" and isinstance(msg.get("count"), int):
            self.count = msg["count"]
        elif event == "error" and self.error is None:
            self.error = _error_class(msg.get("type"))(text)
        else:
            self.log("warn", f"restore helper: unexpected message {str(msg)[:200]}")

    def pump(self, messages: queue.Queue[dict[str, Any] | None]) -> None:
        while not self.ended:
            try:
                self.handle(messages.get_nowait())
            except queue.Empty:
                return


def _tail(f: IO[bytes]) -> str:
    f.seek(0, os.SEEK_END)
    size = f.tell()
    f.seek(max(0, size - 2000))
    return f.read().decode("utf-8", "replace").strip()


def _open_targets(targets: Mapping[str, Path], uid: int, gid: int) -> dict[str, int]:
    fds: dict[str, int] = {}
    try:
        for ct_path, host_dir in targets.items():
            fd = os.open(host_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            fds[ct_path] = fd
            # The namespace's root writes into it, and the kernel lets it only
            # into what it owns (Proxmox VE chowns a new rootfs the same way).
            os.fchown(fd, uid, gid)
    except OSError as exc:
        for fd in fds.values():
            os.close(fd)
        raise os_error(exc, "cannot open restore target") from exc
    return fds


def restore_in_userns(
    targets: Mapping[str, Path],
    id_map: Sequence[IdMapEntry],
    *,
    log: LogFunction,
    label: str,
    source_fd: int | None = None,
    feed: Feed | None = None,
) -> int:
    """Restore a tar stream into ``targets`` as root of a namespace with ``id_map``.

    The stream is read from ``source_fd`` (an open archive) or written by ``feed``
    (exactly one of them). ``targets`` and ``id_map`` are those of
    :class:`~pvebackup.host.lxc.writer.SafeTreeWriter`; the target directories get
    the container's root as owner first. Returns the number of entries restored.
    Raises what the writer or the tar parser raised in the helper (same class),
    :class:`GuestConfigError` for a map that does not map the container's root,
    :class:`ExternalToolError` when the helper cannot run.
    """
    if (source_fd is None) == (feed is None):
        raise ValueError("give exactly one of source_fd and feed")
    if "/" not in targets:
        raise ValueError("targets must include the container root '/'")
    uid, gid = _root_ids(id_map)
    target_fds = _open_targets(targets, uid, gid)
    msg_r, msg_w = os.pipe()
    go_r, go_w = os.pipe()
    config = {
        "parent": os.getpid(),
        "msg_fd": msg_w,
        "go_fd": go_r,
        "targets": target_fds,
        "id_map": [e.as_list() for e in id_map],
        "label": label,
    }
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_SRC_DIR), env.get("PYTHONPATH")]))
    messages: queue.Queue[dict[str, Any] | None] = queue.Queue()
    relay = _Relay(log)
    child: Child | None = None
    reader: threading.Thread | None = None
    go_open = True
    with tempfile.TemporaryFile() as stderr, os.fdopen(msg_r, "rb") as msg_stream:
        try:
            try:
                # Through kit.proc: it dies with us and the guest's run state records
                # it, so a run after a crash finds it (it also asks for PDEATHSIG itself).
                child = spawn(
                    [sys.executable, "-m", CHILD_MODULE, json.dumps(config)],
                    stdin=source_fd if source_fd is not None else subprocess.PIPE,
                    stdout=subprocess.DEVNULL,
                    stderr=stderr,
                    pass_fds=(*target_fds.values(), msg_w, go_r),
                    cwd="/",
                    env=env,
                )
            except ExternalToolError as exc:
                raise ExternalToolError(f"cannot start the restore helper: {exc}") from exc
            finally:
                os.close(msg_w)
                os.close(go_r)
                for fd in target_fds.values():
                    os.close(fd)
            reader = threading.Thread(
                target=_read_messages,
                args=(msg_stream, messages),
                name="restore-helper-messages",
                daemon=True,
            )
            reader.start()
            proc = child.popen
            go_open = False
            _handshake(proc, id_map, messages, relay, go_w, stderr)
            if feed is not None:
                assert proc.stdin is not None
                try:
                    feed(proc.stdin, lambda: relay.pump(messages))  # type: ignore[arg-type]
                    proc.stdin.close()
                except BrokenPipeError:
                    pass  # the helper stopped reading: its error message says why
            while not relay.ended:
                relay.handle(messages.get())
            rc = proc.wait()
        finally:
            if go_open:
                os.close(go_w)
            if child is not None:
                if child.poll() is None:
                    child.signal(signal.SIGKILL)
                child.wait()
                if child.stdin is not None:
                    try:
                        child.stdin.close()
                    except BrokenPipeError:
                        pass
                child.stop(0)  # reaped already: closes its pipes, tells the run state
            if reader is not None:
                reader.join()
        if relay.error is not None:
            raise relay.error
        if rc != 0 or relay.count is None:
            raise ExternalToolError(
                f"restore helper failed (exit {rc}): {_tail(stderr) or 'no message'}"
            )
    return relay.count


def _handshake(
    proc: subprocess.Popen[bytes],
    id_map: Sequence[IdMapEntry],
    messages: queue.Queue[dict[str, Any] | None],
    relay: _Relay,
    go_w: int,
    stderr: IO[bytes],
) -> None:
    """Wait for the helper's new namespace, give it the map, let it go on."""
    try:
        first = messages.get(timeout=_HANDSHAKE_SECONDS)
    except queue.Empty:
        raise ExternalToolError("the restore helper did not start in time") from None
    if first is None or first.get("event") != "unshared":
        relay.handle(first)
        if relay.error is not None:
            raise relay.error
        proc.wait()
        raise ExternalToolError(
            f"the restore helper did not start (exit {proc.returncode}):"
            f" {_tail(stderr) or 'no message'}"
        )
    try:
        _write_maps(proc.pid, id_map)
        os.write(go_w, b"g")
    except OSError as exc:
        raise ExternalToolError(f"cannot give the restore helper its id map: {exc}") from exc
    finally:
        os.close(go_w)
