"""JSON lines on a pipe: reading bounded lines, writing whole messages.

The framing of docs/bridge-protocol.md: one JSON object per ``\\n``-terminated
UTF-8 line, at most :data:`MAX_LINE` bytes. Both directions share it: the helper
reads requests from stdin and writes responses and log messages to stdout; an
attached helper (see :mod:`pvebackup.bridge.attach`) speaks the same framing on
a unix socket.

The peer is the Perl plugin (root, same host), still a line that is too long or
not JSON must not make the helper allocate without bound or die silently: it is
answered with a typed error and the helper reads on.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any, Final

from pvebackup.api.errors import PveBackupError, UsageError

__all__ = ["MAX_LINE", "Oversized", "Scrubber", "Writer", "decode", "error_body", "read_line"]

MAX_LINE: Final = 16 * 1024 * 1024
"""Longest line either side accepts, newline included (16 MiB)."""

_SKIP_CHUNK: Final = 1024 * 1024


@dataclass(frozen=True, slots=True)
class Oversized:
    """A line longer than the limit was read and thrown away (its length in bytes)."""

    length: int


def read_line(stream: IO[bytes], limit: int = MAX_LINE) -> bytes | Oversized | None:
    """The next line without its newline, :class:`Oversized`, or ``None`` at EOF.

    Never holds more than ``limit`` bytes of one line in memory: the rest of a
    too long line is read in chunks and dropped, so the next line is read
    cleanly (threat: a runaway or hostile writer exhausting memory).
    A last line without newline before EOF counts as a line.
    """
    line = stream.readline(limit)
    if not line:
        return None
    if line.endswith(b"\n"):
        return line[:-1]
    if len(line) < limit:
        return line  # EOF without a newline
    total = len(line)
    while True:
        chunk = stream.readline(_SKIP_CHUNK)
        total += len(chunk)
        if not chunk or chunk.endswith(b"\n"):
            return Oversized(total)


def decode(line: bytes) -> dict[str, Any]:
    """Parse one line into a JSON object.

    :raises UsageError: not UTF-8, not JSON, or not an object.
    """
    try:
        value = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise UsageError(f"bridge: line is not UTF-8 (at byte {exc.start})") from None
    except ValueError as exc:
        raise UsageError(f"bridge: line is not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise UsageError(f"bridge: a message must be a JSON object, not {type(value).__name__}")
    return value


def error_body(exc: BaseException) -> dict[str, Any]:
    """``{"type", "message", "exit"}`` of an error response.

    Our errors keep their class name and exit code; anything else is a bug of
    the provider or of the helper, reported as ``PluginError`` (exit 4) with the
    foreign class named (the traceback goes to stderr, see the server).
    """
    if isinstance(exc, PveBackupError):
        name = getattr(exc, "type_name", type(exc).__name__)  # relayed errors keep theirs
        return {"type": name, "message": str(exc), "exit": exc.exit_code}
    return {
        "type": "PluginError",
        "message": f"internal error ({type(exc).__name__}): {exc}",
        "exit": 4,
    }


class Writer:
    """Writes whole messages to a binary stream, one line each, thread-safe.

    A provider may log from worker threads while the main thread answers: the
    lock keeps every line whole. ``scrub`` is applied to the encoded line, so a
    secret can never leave the process whatever a message holds.
    """

    def __init__(self, stream: IO[bytes], scrub: Callable[[str], str] | None = None) -> None:
        self._stream = stream
        self._lock = threading.Lock()
        self.scrub: Callable[[str], str] = scrub or Scrubber()

    def send(self, message: dict[str, Any]) -> None:
        text = json.dumps(message, ensure_ascii=False, separators=(",", ":"))
        data = self.scrub(text).encode("utf-8", "surrogateescape") + b"\n"
        with self._lock:
            self._stream.write(data)
            self._stream.flush()


class Scrubber:
    """Replaces known secrets by ``***`` in outgoing text (defence in depth: a
    provider that puts a passphrase into an error message must not leak it)."""

    def __init__(self) -> None:
        self._secrets: list[str] = []

    def add(self, secret: str) -> None:
        if secret:
            self._secrets.append(secret)
            # JSON-escaped forms too: the scrub runs on the encoded line.
            escaped = json.dumps(secret, ensure_ascii=False)[1:-1]
            if escaped != secret:
                self._secrets.append(escaped)

    def __call__(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text
