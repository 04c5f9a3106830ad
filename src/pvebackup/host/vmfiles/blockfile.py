"""A restore source seen as plain files, through ``qemu-storage-daemon``'s FUSE export.

The point of :mod:`pvebackup.host.vmfiles` is that a guest's file system, hostile
input, never reaches the host kernel's file system drivers. What *does* reach the
kernel here is only FUSE, which moves opaque bytes: the daemon opens the provider's
restore source (a path, an NBD URI, a ``json:`` name), read-only, and exposes it
(or a byte range of it: one partition) as a regular file. Userspace tools
(``debugfs``) then read that file as a file system image.

The source is never probed: a path or NBD URI is raw, a ``json:`` name is used
exactly as the provider pinned it (the rule of :func:`pvebackup.host.restore`'s
``_source_format``), so a qcow2 header inside a guest's raw disk opens nothing.

The mounts are the daemon's: it removes them when it quits (``quit``, SIGTERM).
Killed with SIGKILL (it dies with us), it leaves a dead mount in our private
directory; :func:`pvebackup.host.vmfiles.session` detaches those on the next run.
"""

from __future__ import annotations

import json
import os
import urllib.parse
from pathlib import Path
from types import TracebackType
from typing import Any

from pvebackup.api.errors import PluginError, QmpError, UnsupportedError
from pvebackup.host.qemu.daemon import StorageDaemon

__all__ = ["BlockFiles", "source_blockdev"]


def source_blockdev(source: str) -> dict[str, Any]:
    """QMP ``blockdev-add`` options that open a restore source read-only, unprobed.

    :raises PluginError: a ``json:`` name that is not an object with a driver, or
        a relative path.
    :raises UnsupportedError: a URI scheme other than ``nbd``/``nbd+unix``.
    """
    if source.startswith("json:"):
        try:
            spec = json.loads(source[len("json:") :])
        except ValueError as exc:
            raise PluginError(f"restore source is not a valid json: file name: {exc}") from exc
        if not isinstance(spec, dict) or not isinstance(spec.get("driver"), str):
            raise PluginError("restore source json: file name names no format driver")
        return spec
    parsed = urllib.parse.urlsplit(source)
    if parsed.scheme in ("nbd", "nbd+unix"):
        export = urllib.parse.unquote(parsed.path.lstrip("/"))
        query = urllib.parse.parse_qs(parsed.query)
        if parsed.scheme == "nbd+unix":
            sockets = query.get("socket", [])
            if len(sockets) != 1:
                raise PluginError(f"restore source {source!r:.200}: no socket= in NBD URI")
            server = {"type": "unix", "path": sockets[0]}
        else:
            server = {"type": "inet", "host": parsed.hostname or "localhost",
                      "port": str(parsed.port or 10809)}  # fmt: skip
        nbd: dict[str, Any] = {"driver": "nbd", "server": server}
        if export:
            nbd["export"] = export
        return {"driver": "raw", "file": nbd}
    if parsed.scheme and "/" not in source.split(":", 1)[0]:
        raise UnsupportedError(f"restore source {source!r:.200}: unsupported URI scheme")
    if not os.path.isabs(source):
        raise PluginError(f"restore source {source!r:.200} is not an absolute path")
    return {"driver": "raw", "file": {"driver": "file", "filename": source}}


class BlockFiles:
    """One daemon holding one restore source; exports byte ranges of it as files.

    :param workdir: a private (0700) directory of ours; the export files are made in it.
    """

    def __init__(self, source: str, workdir: Path) -> None:
        self.source = source
        self.workdir = workdir
        self.daemon = StorageDaemon(runtime_parent=workdir)
        self._exports = 0

    def __enter__(self) -> BlockFiles:
        spec = dict(source_blockdev(self.source))
        spec["node-name"] = "src"
        spec["read-only"] = True
        self.daemon.start()
        try:
            self.daemon.execute("blockdev-add", **spec)
        except BaseException:
            self.daemon.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.daemon.stop()

    def size(self) -> int:
        """The virtual size of the whole source, in bytes."""
        for node in self.daemon.execute("query-named-block-nodes", flat=True):
            if node.get("node-name") == "src":
                return int(node["image"]["virtual-size"])
        raise QmpError("qemu-storage-daemon: the restore source node is gone")

    def export(self, offset: int = 0, size: int | None = None) -> Path:
        """A read-only file showing ``size`` bytes of the source from ``offset``."""
        self._exports += 1
        n = self._exports
        node = "src"
        if offset or size is not None:
            node = f"range{n}"
            opts: dict[str, Any] = {"driver": "raw", "node-name": node, "file": "src",
                                    "offset": offset, "read-only": True}  # fmt: skip
            if size is not None:
                opts["size"] = size
            self.daemon.execute("blockdev-add", **opts)
        path = self.workdir / f"export{n}.img"
        path.touch(mode=0o600)
        self.daemon.execute(
            "block-export-add",
            **{"type": "fuse", "id": f"export{n}", "node-name": node,
               "mountpoint": str(path), "writable": False},
        )  # fmt: skip
        return path
