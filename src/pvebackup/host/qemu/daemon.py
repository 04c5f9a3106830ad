"""Start and stop one ``qemu-storage-daemon`` driven over QMP.

The daemon gets a private runtime directory (mode 0700) holding its QMP socket,
its log and whatever sockets the caller adds (the NBD server's). It runs in its
own session, so a Ctrl-C on the terminal reaches only us: the host must be able
to finish the bitmaps over QMP before the daemon goes away.

Stopping escalates: ``quit`` over QMP, then SIGTERM, then SIGKILL, each by PID
and each followed by a bounded wait; the process is always reaped. It is started
through :mod:`pvebackup.kit.proc`, so it dies with us even when we are killed
with SIGKILL (no orphan keeps the image's write lock), and a guest's run state
records its PID for the next run to check.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from pvebackup.api.errors import ExternalToolError, QmpError
from pvebackup.kit.proc import Child, private_dir, spawn

from .qmp import QmpClient, QmpConnectionError

__all__ = ["StorageDaemon"]

_BINARY = "qemu-storage-daemon"
# 107 bytes for a socket path, minus "/pvebackup-qsd-XXXXXXXX/qmp.sock" and a margin.
_MAX_PARENT_LEN = 64
_HANDSHAKE_TIMEOUT = 10.0
"""Seconds one QMP greeting + qmp_capabilities may take before a new connection."""


class StorageDaemon:
    """A running ``qemu-storage-daemon`` with a connected QMP client.

    Use as a context manager, or call :meth:`start` and :meth:`stop`.

    :param runtime_parent: where the private runtime directory is made; the system
        temporary directory when None or when socket paths there would be too long.
    :param start_timeout: seconds to wait for the QMP socket to accept.
    :param qmp_timeout: seconds each QMP command may take.
    :param stop_timeout: seconds to wait at each stop escalation step.
    """

    def __init__(
        self,
        *,
        binary: str = _BINARY,
        runtime_parent: Path | None = None,
        start_timeout: float = 15.0,
        qmp_timeout: float = 60.0,
        stop_timeout: float = 5.0,
    ) -> None:
        self.binary = binary
        self.runtime_parent = runtime_parent
        self.start_timeout = start_timeout
        self.qmp_timeout = qmp_timeout
        self.stop_timeout = stop_timeout
        self._proc: Child | None = None
        self._qmp: QmpClient | None = None
        self._runtime_dir: Path | None = None

    # -- properties ---------------------------------------------------------------

    @property
    def pid(self) -> int:
        """The daemon's process id (valid after :meth:`start`)."""
        if self._proc is None:
            raise RuntimeError("qemu-storage-daemon is not started")
        return self._proc.pid

    @property
    def runtime_dir(self) -> Path:
        """Private directory (0700) for sockets; removed by :meth:`stop`."""
        if self._runtime_dir is None:
            raise RuntimeError("qemu-storage-daemon is not started")
        return self._runtime_dir

    @property
    def qmp(self) -> QmpClient:
        """The QMP session (valid after :meth:`start`)."""
        if self._qmp is None:
            raise RuntimeError("qemu-storage-daemon is not started")
        return self._qmp

    @property
    def alive(self) -> bool:
        """True while the process runs (a dead one is reaped here)."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def returncode(self) -> int | None:
        """Exit status once the process ended (negative: killed by that signal)."""
        return None if self._proc is None else self._proc.poll()

    def execute(self, cmd: str, /, **args: Any) -> Any:
        """Shorthand for ``self.qmp.execute``."""
        return self.qmp.execute(cmd, **args)

    def log_tail(self, limit: int = 2000) -> str:
        """The end of the daemon's stderr/stdout, for error messages."""
        if self._runtime_dir is None:
            return ""
        try:
            data = (self._runtime_dir / "daemon.log").read_bytes()
        except OSError:
            return ""
        return data[-limit:].decode(errors="replace").strip()

    # -- life cycle ---------------------------------------------------------------

    def start(self) -> StorageDaemon:
        """Start the daemon and connect to its QMP monitor.

        :raises ExternalToolError: it cannot be started or does not answer; in that
            case nothing is left running and the runtime directory is gone.
        """
        if self._proc is not None:
            raise RuntimeError("qemu-storage-daemon already started")
        parent = self.runtime_parent
        if parent is not None and len(str(parent.resolve())) > _MAX_PARENT_LEN:
            parent = None  # Unix socket paths are limited to 107 bytes
        self._runtime_dir = private_dir("pvebackup-qsd-", parent)
        qmp_path = self._runtime_dir / "qmp.sock"
        try:
            with open(self._runtime_dir / "daemon.log", "wb") as log:
                self._proc = self._spawn(
                    [
                        self.binary,
                        "--chardev",
                        f"socket,path={qmp_path},server=on,wait=off,id=qmp0",
                        "--monitor",
                        "chardev=qmp0",
                    ],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    new_session=True,
                )
            self._qmp = self._connect(qmp_path)
        except OSError as exc:
            self.stop()
            raise ExternalToolError(f"cannot start {self.binary}: {exc}") from exc
        except BaseException:
            self.stop()
            raise
        return self

    def _spawn(self, argv: list[str], **kwargs: Any) -> Child:
        try:
            return spawn(argv, **kwargs)
        except ExternalToolError as exc:
            raise ExternalToolError(f"cannot start {self.binary}: {exc}") from exc

    def _connect(self, qmp_path: Path) -> QmpClient:
        # The socket file exists as soon as the chardev listens, before the monitor
        # is attached; a client connecting in that window was seen (about once per
        # thousand starts) to get its greeting but never an answer to
        # qmp_capabilities. So each handshake gets a short timeout and a fresh
        # connection is tried again, within start_timeout + qmp_timeout overall.
        deadline = time.monotonic() + self.start_timeout
        handshake_deadline = deadline + self.qmp_timeout
        while True:
            assert self._proc is not None
            code = self._proc.poll()
            if code is not None:
                raise ExternalToolError(
                    f"{self.binary} exited with status {code} at start: {self.log_tail()}"
                )
            if qmp_path.exists():
                try:
                    client = QmpClient(
                        str(qmp_path), timeout=min(self.qmp_timeout, _HANDSHAKE_TIMEOUT)
                    )
                    client.timeout = self.qmp_timeout
                    return client
                except QmpConnectionError as exc:
                    if "no answer" in str(exc) and time.monotonic() < handshake_deadline:
                        continue  # a fresh connection, see above
                    if time.monotonic() > deadline:
                        raise ExternalToolError(
                            f"{self.binary}: QMP does not answer: {exc}"
                        ) from exc
                except (OSError, QmpError) as exc:
                    if time.monotonic() > deadline:
                        raise ExternalToolError(
                            f"{self.binary}: QMP does not answer: {exc}"
                        ) from exc
            if time.monotonic() > deadline:
                raise ExternalToolError(
                    f"{self.binary}: no QMP socket after {self.start_timeout:g} s"
                )
            time.sleep(0.02)

    def stop(self) -> int | None:
        """Stop the daemon (quit, SIGTERM, SIGKILL), reap it, remove the runtime dir.

        Idempotent and safe when the daemon already died. Returns the exit status.
        """
        try:
            proc = self._proc
            if proc is not None and proc.poll() is None and self._qmp is not None:
                try:
                    self._qmp.execute("quit")
                except QmpError:
                    pass  # the connection may close before the answer arrives
            if self._qmp is not None:
                self._qmp.close()
            if proc is not None:
                self._wait_or_signal(proc, signal.SIGTERM)
                # SIGKILL, reaped, reported to the run state as ended
                return proc.stop(self.stop_timeout, remove_run_dir=False)
            return None
        finally:
            if self._runtime_dir is not None:
                shutil.rmtree(self._runtime_dir, ignore_errors=True)

    def _wait_or_signal(self, proc: Child, sig: signal.Signals) -> None:
        try:
            proc.wait(timeout=self.stop_timeout)
            return
        except subprocess.TimeoutExpired:
            pass
        proc.signal(sig)

    def __enter__(self) -> StorageDaemon:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
