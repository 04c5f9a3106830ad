"""The QEMU guest agent on a running VM's ``VMID.qga`` socket: fs-freeze and thaw.

The agent speaks QMP's JSON without a greeting. A client that connects cannot know
what an earlier client left unread, so each session starts with ``guest-sync``
and a random id and skips every line until the answer carrying that id.

What the agent sends is the guest's: a guest that owns its agent may answer
anything or nothing. Every read has a deadline, lines are bounded, and an answer
we cannot parse is an error for the freeze (the backup goes on unfrozen) and
never more than that.
"""

from __future__ import annotations

import json
import secrets
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pvebackup.api.types import LogFunction, LogLevel

__all__ = ["AgentError", "GuestAgent", "frozen_filesystems"]

_MAX_LINE = 1 << 20  # a hostile guest must not make us buffer without end


class AgentError(Exception):
    """The agent did not answer in time or answered with an error."""


class GuestAgent:
    """One session with a guest agent; every call waits at most ``timeout``."""

    def __init__(self, path: Path, *, timeout: float) -> None:
        self.timeout = timeout
        self._buf = b""
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._sock.settimeout(timeout)
            self._sock.connect(str(path))
            token = secrets.randbelow(1 << 31)
            self._send("guest-sync", id=token)
            deadline = time.monotonic() + timeout
            while self._read(deadline).get("return") != token:
                pass
        except OSError as exc:
            self.close()
            raise AgentError(f"guest agent {path}: {exc}") from exc
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        self._sock.close()

    def execute(self, cmd: str, /, timeout: float | None = None, **args: Any) -> Any:
        try:
            self._send(cmd, **args)
            deadline = time.monotonic() + (timeout or self.timeout)
            while True:
                msg = self._read(deadline)
                if "error" in msg:
                    raise AgentError(f"guest agent {cmd}: {str(msg['error'])[:200]}")
                if "return" in msg:
                    return msg["return"]
        except OSError as exc:
            raise AgentError(f"guest agent {cmd}: {exc}") from exc

    def _send(self, cmd: str, **args: Any) -> None:
        msg: dict[str, Any] = {"execute": cmd}
        if args:
            msg["arguments"] = args
        self._sock.sendall(json.dumps(msg).encode() + b"\n")

    def _read(self, deadline: float) -> dict[str, Any]:
        while b"\n" not in self._buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AgentError(f"guest agent: no answer within {self.timeout:g} s")
            self._sock.settimeout(remaining)
            try:
                chunk = self._sock.recv(65536)
            except TimeoutError as exc:
                raise AgentError(f"guest agent: no answer within {self.timeout:g} s") from exc
            if not chunk:
                raise AgentError("guest agent closed the connection")
            self._buf += chunk
            if len(self._buf) > _MAX_LINE:
                raise AgentError("guest agent: answer too long")
        line, _, self._buf = self._buf.partition(b"\n")
        try:
            msg = json.loads(line.strip(b"\xff") or b"{}")
        except ValueError as exc:
            raise AgentError(f"guest agent: malformed answer {line[:100]!r}") from exc
        return msg if isinstance(msg, dict) else {}


@contextmanager
def frozen_filesystems(
    path: Path | None, *, log: LogFunction, timeout: float = 10.0
) -> Iterator[bool]:
    """Freeze the guest's file systems for the block; always thaw. Yields True if frozen.

    ``path`` None means the VM has no agent configured. An agent that does not
    answer within ``timeout`` is logged at warn and the backup goes on unfrozen
    (crash-consistent, as without an agent).
    """
    if path is None:
        log(LogLevel.WARN, "no guest agent configured (agent: 1): file systems not frozen")
        yield False
        return
    agent: GuestAgent | None = None
    frozen = False
    try:
        try:
            agent = GuestAgent(path, timeout=timeout)
            agent.execute("guest-fsfreeze-freeze")
            frozen = True
            log(LogLevel.INFO, "guest agent: file systems frozen")
        except AgentError as exc:
            log(LogLevel.WARN, f"{exc}; continuing without freezing the file systems")
        yield frozen
    finally:
        if agent is not None:
            try:
                # Thaw also after a failed freeze: a freeze that timed out here may
                # still have happened in the guest.
                agent.execute("guest-fsfreeze-thaw")
                if frozen:
                    log(LogLevel.INFO, "guest agent: file systems thawed")
            except AgentError as exc:
                level = LogLevel.ERR if frozen else LogLevel.WARN
                log(level, f"thawing the guest's file systems: {exc}")
            finally:
                agent.close()
