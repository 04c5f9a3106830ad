"""The user-namespace step of a container backup: an attached helper.

vzdump calls ``backup_container`` in a forked child that has entered the
container's user namespace (pve-container ``PVE/VZDump/LXC.pm``,
``run_in_userns``). That child cannot use the job helper's pipe safely (its
parent holds it), so it starts its own helper, which *attaches* to the job
helper:

1. ``backup_container_prepare`` (job helper, privileged) opens a unix socket in
   a fresh 0700 directory owned by the container's root user (``backup-user-id``,
   as the host sees it) and answers ``{"attach": {"socket": PATH, "secret": HEX}}``.
2. The child's helper gets that token in its ``hello`` (the pipe, never argv),
   connects, proves the secret, and forwards its one ``backup_container``
   request; log messages come back over the socket and are relayed to its
   stdout; so is the response.
3. The job helper runs the seed's ``backup_directory`` itself, as root outside
   the namespace, with the id map of the container's configuration: exactly
   what a seed-API provider expects (host ids plus the map, storage files owned
   by root). The namespace child only relays, so no provider code ever runs
   with the container root's identity, and a provider needs no credentials
   handed to an unprivileged user.

Threat: another process of the container's root uid (on the host side) could
reach the socket; the directory is private to that uid and the secret (128
random bits, compared in constant time) is needed before anything is served.
One connection is accepted, then the socket is removed.
"""

from __future__ import annotations

import hmac
import os
import secrets
import shutil
import socket
import sys
import tempfile
import threading
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pvebackup.api.errors import PveBackupError, UsageError
from pvebackup.bridge.framing import Oversized, Writer, decode, error_body, read_line

__all__ = ["AttachListener", "attach_client"]

_ACCEPT_POLL = 0.2


class _SocketWriter(Writer):
    """A writer whose peer may vanish: a lost attached helper must not fail the
    backup through the provider's log function."""

    def send(self, message: dict[str, Any]) -> None:
        try:
            super().send(message)
        except OSError as exc:
            print(f"pvebackup-bridge: attach connection lost: {exc}", file=sys.stderr)


class AttachListener:
    """Serves one ``backup_container`` request for the job helper, in a thread.

    :param run: runs the request's params under the given writer (the job
        helper routes the provider's log there meanwhile) and returns the result.
    """

    def __init__(
        self,
        uid: int,
        run: Callable[[dict[str, Any], Writer], Any],
        scrub: Callable[[str], str],
    ) -> None:
        self.secret = secrets.token_hex(16)
        self.dir = Path(tempfile.mkdtemp(prefix="pvebackup-attach-"))
        self.path = self.dir / "socket"
        self._run = run
        self._scrub = scrub
        self._stop = threading.Event()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._sock.bind(str(self.path))
            os.chmod(self.path, 0o600)
            if uid:
                os.chown(self.path, uid, uid)
                os.chown(self.dir, uid, uid)
            self._sock.listen(1)
            self._sock.settimeout(_ACCEPT_POLL)
        except OSError:
            self._sock.close()
            shutil.rmtree(self.dir, ignore_errors=True)
            raise
        self._thread = threading.Thread(target=self._serve, name="bridge-attach", daemon=True)
        self._thread.start()

    def token(self) -> dict[str, str]:
        return {"socket": str(self.path), "secret": self.secret}

    def finish(self) -> None:
        """Stop accepting and wait for a request in progress to end."""
        self._stop.set()
        self._thread.join()
        self._sock.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                conn.settimeout(None)
                self._serve_one(conn)
            return

    def _serve_one(self, conn: socket.socket) -> None:
        rfile = conn.makefile("rb")
        writer = _SocketWriter(conn.makefile("wb"), self._scrub)
        first = read_line(rfile)
        if first is None or isinstance(first, Oversized):
            return
        try:
            proof = decode(first).get("secret")
        except UsageError:
            return
        if not isinstance(proof, str) or not hmac.compare_digest(proof, self.secret):
            writer.send({"id": None, "error": error_body(UsageError("attach: wrong secret"))})
            return
        line = read_line(rfile)
        if line is None or isinstance(line, Oversized):
            return
        rid: Any = None
        try:
            msg = decode(line)
            rid = msg.get("id")
            if msg.get("method") != "backup_container":
                raise UsageError("attach: only backup_container is served over an attachment")
            result = self._run(msg.get("params") or {}, writer)
        except Exception as exc:  # noqa: BLE001 - every failure becomes a response
            if not isinstance(exc, PveBackupError):
                print(self._scrub(traceback.format_exc()), file=sys.stderr)
            writer.send({"id": rid, "error": error_body(exc)})
            return
        writer.send({"id": rid, "result": result})


def attach_client(token: object) -> tuple[socket.socket, Any, Writer]:
    """Connect to the job helper named by ``token``; (socket, reader, writer).

    :raises UsageError: a malformed token or a socket that cannot be reached.
    """
    if not isinstance(token, dict):
        raise UsageError("hello: attach must be an object {socket, secret}")
    path, secret = token.get("socket"), token.get("secret")
    if not isinstance(path, str) or not isinstance(secret, str):
        raise UsageError("hello: attach needs 'socket' and 'secret' strings")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
    except OSError as exc:
        sock.close()
        raise UsageError(f"hello: cannot attach to the job helper: {exc.strerror}") from exc
    writer = Writer(sock.makefile("wb"))
    writer.send({"secret": secret})
    return sock, sock.makefile("rb"), writer
