"""A small synchronous QMP client over a Unix socket.

QMP is JSON objects, one per line: the server greets with ``{"QMP": ...}``, the
client negotiates with ``qmp_capabilities``, then every ``{"execute": ...}`` gets
exactly one ``{"return": ...}`` or ``{"error": ...}`` answer carrying the same
``id``. Asynchronous ``{"event": ...}`` messages can arrive at any time; they are
kept (the most recent ones) in :attr:`QmpClient.events` and otherwise skipped.

One client serves one thread. There is no asyncio here on purpose (see
docs/design.md, "Concurrency"): the host calls a handful of commands per backup.
"""

from __future__ import annotations

import json
import socket
import time
from collections import deque
from types import TracebackType
from typing import Any

from pvebackup.api.errors import QmpError

__all__ = ["QmpClient", "QmpConnectionError"]

_MAX_EVENTS = 1000
_MAX_LINE = 16 * 1024 * 1024


class QmpConnectionError(QmpError):
    """The QMP connection is gone (the daemon died, or it timed out)."""


class QmpClient:
    """A connected, negotiated QMP session.

    :param path: the QMP monitor's Unix socket.
    :param timeout: seconds to wait for connecting and for each answer.
    :raises QmpConnectionError: cannot connect, or no valid greeting.
    """

    def __init__(self, path: str, *, timeout: float = 30.0) -> None:
        self.path = path
        self.timeout = timeout
        self.events: deque[dict[str, Any]] = deque(maxlen=_MAX_EVENTS)
        self._buf = b""
        self._next_id = 0
        self._broken = False
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._sock.settimeout(timeout)
            self._sock.connect(path)
            greeting = self._read_message()
            if "QMP" not in greeting:
                raise QmpConnectionError(f"QMP {path}: unexpected greeting {greeting!r}")
            self.execute("qmp_capabilities")
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> QmpClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def connected(self) -> bool:
        """False once the connection was closed or found broken."""
        return not self._broken

    def close(self) -> None:
        """Close the connection (idempotent)."""
        self._broken = True
        self._sock.close()

    def execute(self, cmd: str, /, **args: Any) -> Any:
        """Run one QMP command and return its ``return`` value.

        Arguments whose QMP names contain dashes are passed as
        ``execute("blockdev-add", **{"node-name": "n0", ...})``.

        :raises QmpError: QEMU answered with an error; the message names the
            command and carries QEMU's description.
        :raises QmpConnectionError: the connection broke or timed out; the client
            is unusable afterwards.
        """
        if self._broken:
            raise QmpConnectionError(f"QMP {cmd}: connection to {self.path} is closed")
        self._next_id += 1
        msg_id = f"pvebackup-{self._next_id}"
        request: dict[str, Any] = {"execute": cmd, "id": msg_id}
        if args:
            request["arguments"] = args
        try:
            self._sock.sendall(json.dumps(request).encode() + b"\n")
        except OSError as exc:
            self._broken = True
            raise QmpConnectionError(f"QMP {cmd}: cannot send: {exc}") from exc
        deadline = time.monotonic() + self.timeout
        while True:
            reply = self._read_message(deadline, cmd)
            if "event" in reply:
                self.events.append(reply)
                continue
            if reply.get("id") != msg_id:
                continue  # an answer to a request given up on earlier
            if "error" in reply:
                err = reply["error"]
                desc = err.get("desc", "") if isinstance(err, dict) else str(err)
                klass = err.get("class", "") if isinstance(err, dict) else ""
                raise QmpError(f"QMP {cmd} failed: {desc}" + (f" ({klass})" if klass else ""))
            return reply.get("return")

    def events_named(self, name: str) -> list[dict[str, Any]]:
        """The collected events called ``name``, oldest first."""
        return [e for e in self.events if e.get("event") == name]

    def _read_message(self, deadline: float | None = None, cmd: str = "greeting") -> Any:
        if deadline is None:
            deadline = time.monotonic() + self.timeout
        while b"\n" not in self._buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._broken = True
                raise QmpConnectionError(f"QMP {cmd}: no answer within {self.timeout:g} s")
            try:
                self._sock.settimeout(remaining)
                chunk = self._sock.recv(65536)
            except TimeoutError as exc:
                self._broken = True
                raise QmpConnectionError(f"QMP {cmd}: no answer within {self.timeout:g} s") from exc
            except OSError as exc:
                self._broken = True
                raise QmpConnectionError(f"QMP {cmd}: connection lost: {exc}") from exc
            if not chunk:
                self._broken = True
                raise QmpConnectionError(f"QMP {cmd}: connection closed by QEMU")
            self._buf += chunk
            if len(self._buf) > _MAX_LINE:
                self._broken = True
                raise QmpConnectionError(f"QMP {cmd}: message too long")
        line, _, self._buf = self._buf.partition(b"\n")
        try:
            msg = json.loads(line)
        except ValueError as exc:
            self._broken = True
            raise QmpConnectionError(f"QMP {cmd}: malformed message {line[:200]!r}") from exc
        if not isinstance(msg, dict):
            self._broken = True
            raise QmpConnectionError(f"QMP {cmd}: malformed message {line[:200]!r}")
        return msg
