"""Hand a seed provider's restore source to Proxmox VE as *raw* data.

The seed lets ``restore_qemu_img_init`` return a ``json:`` pseudo-file name
whose top-level ``driver`` names another format (backup-dir hands over its
pinned qcow2 chain that way). qemu-server's ``restore_external_archive`` reads
``qemu-img-path`` as ``raw`` only (``file_size_info(..., 'raw', 1)`` and
``convert`` with ``source-path-format => 'raw'``): the format is never taken
from the source, since a guest's raw disk could otherwise pass as qcow2 naming
host files. So such a source is opened by a private ``qemu-nbd --read-only``
(it follows exactly the pinned chain the provider gave) and Proxmox VE gets a
raw NBD URI of it. A plain path, an NBD URI or a ``json:`` name with driver
``raw`` is passed on as it is.
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from typing import Final

from pvebackup.api.errors import ExternalToolError, PluginError
from pvebackup.kit.proc import Child, private_dir, spawn

__all__ = ["RawExport", "needs_export"]

_START_TIMEOUT: Final = 30.0


def needs_export(source: str) -> bool:
    """Whether ``source`` is a ``json:`` name of a format other than raw."""
    if not source.startswith("json:"):
        return False
    try:
        spec = json.loads(source[len("json:") :])
    except ValueError as exc:
        raise PluginError(f"restore source is not a valid json: file name: {exc}") from exc
    driver = spec.get("driver") if isinstance(spec, dict) else None
    if not isinstance(driver, str):
        raise PluginError("restore source json: file name names no format driver")
    return driver != "raw"


class RawExport:
    """A read-only ``qemu-nbd`` of ``source``, export ``name``; :attr:`uri` is raw."""

    def __init__(self, source: str, name: str) -> None:
        run_dir = private_dir("pvebackup-bridge-nbd-")
        sock = run_dir / "nbd.sock"
        self.child: Child = spawn(
            [
                "qemu-nbd", "--read-only", "--persistent", "--shared=8",
                f"--socket={sock}", f"--export-name={name}", source,
            ],
            run_dir=run_dir,
            stderr=open(run_dir / "qemu-nbd.log", "wb"),  # noqa: SIM115 - child owns it
        )  # fmt: skip
        deadline = time.monotonic() + _START_TIMEOUT
        # Ready when a connect succeeds: the socket file exists from bind() on,
        # before listen(), and a client in between is refused (seen under load).
        while not _accepts(sock):
            if self.child.poll() is not None or time.monotonic() > deadline:
                log = _tail(run_dir / "qemu-nbd.log")
                self.child.stop()
                raise ExternalToolError(f"qemu-nbd could not open the restore source: {log}")
            time.sleep(0.02)
        self.uri = f"nbd+unix:///{name}?socket={sock}"

    def stop(self) -> None:
        self.child.stop()


def _accepts(path: Path) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        return False
    finally:
        probe.close()
    return True


def _tail(path: Path) -> str:
    try:
        return path.read_bytes()[-2000:].decode("utf-8", "replace").strip()
    except OSError:
        return "(no log)"
