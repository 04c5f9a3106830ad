"""Drive ``python3 -m pvebackup.bridge`` as the Perl plugin does: a child process
with stdin/stdout pipes, one JSON request at a time, log lines collected.

Started and stopped by PID (``Popen``); stderr goes to a file the test can read.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pvebackup

SRC = str(Path(pvebackup.__file__).resolve().parent.parent)


class BridgeError(Exception):
    """An error response: ``type``, ``message``, ``exit``."""

    def __init__(self, body: dict[str, Any]) -> None:
        super().__init__(f"{body.get('type')}: {body.get('message')}")
        self.type = body.get("type")
        self.message = str(body.get("message"))
        self.exit = body.get("exit")


def helper_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = SRC + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.pop("PVEBACKUP_PASSPHRASE_FILE", None)
    return env


class Helper:
    """One helper process. ``argv`` prefix allows ``unshare ...`` in front."""

    def __init__(self, stderr_path: Path, prefix: list[str] | None = None) -> None:
        self.stderr_path = stderr_path
        self._stderr = open(stderr_path, "ab")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            [*(prefix or []), sys.executable, "-m", "pvebackup.bridge"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            env=helper_env(),
        )
        self.logs: list[dict[str, str]] = []
        self.raw_out: list[bytes] = []
        self._next = 0

    # -- low level -------------------------------------------------------------------

    def send_raw(self, data: bytes) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def read(self) -> dict[str, Any]:
        """The next non-log message (log lines are collected in ``logs``)."""
        assert self.proc.stdout is not None
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise EOFError(f"helper exited: {self.stderr_text()}")
            self.raw_out.append(line)
            msg = json.loads(line)
            if "log" in msg:
                self.logs.append(msg["log"])
                continue
            return msg  # type: ignore[no-any-return]

    # -- requests --------------------------------------------------------------------

    def request(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        self._next += 1
        line = json.dumps({"id": self._next, "method": method, "params": params or {}})
        self.send_raw(line.encode() + b"\n")
        msg = self.read()
        assert msg.get("id") == self._next, msg
        return msg

    def call(self, method: str, **params: Any) -> Any:
        """The result of ``method``; an error response raises :class:`BridgeError`."""
        msg = self.request(method, params)
        if "error" in msg:
            raise BridgeError(msg["error"])
        return msg["result"]

    def hello(self, **params: Any) -> Any:
        return self.call("hello", protocol=1, **params)

    # -- end ---------------------------------------------------------------------------

    def eof(self, timeout: float = 60) -> int:
        """Close stdin, read what is left, wait; the exit code."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.close()
        for line in self.proc.stdout:
            self.raw_out.append(line)
            msg = json.loads(line)
            if "log" in msg:
                self.logs.append(msg["log"])
        return self.proc.wait(timeout)

    def bye(self) -> int:
        assert self.call("bye") == {}
        return self.eof()

    def close(self) -> None:
        if self.proc.poll() is None:
            # EOF first, as the Perl side's end: the helper aborts and cleans up;
            # SIGKILL only when it does not end.
            if self.proc.stdin is not None and not self.proc.stdin.closed:
                try:
                    self.proc.stdin.close()
                except OSError:
                    pass
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None and not stream.closed:
                stream.close()
        self._stderr.close()

    def stderr_text(self) -> str:
        return self.stderr_path.read_text(errors="replace") if self.stderr_path.exists() else ""

    def all_output(self) -> bytes:
        return b"".join(self.raw_out) + self.stderr_path.read_bytes()

    def log_text(self) -> str:
        return "\n".join(f"{m['level']}: {m['message']}" for m in self.logs)
