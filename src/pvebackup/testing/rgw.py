"""A real S3 server for tests and ``make bench``: Ceph RGW 16 (Debian's ``radosgw``).

mon + one bluestore OSD on a 2 GiB sparse file + rgw, auth none, on loopback,
ephemeral ports, everything under one directory; about 6 s to start. The daemons
are stopped by PID (:meth:`RGW.stop`) and also die with the process that started
them (``kit.proc.spawn``). The pytest fixtures around it are in
``tests/s3fixture.py`` (one server per session); ``bench`` starts it the same way
(:func:`start_rgw`).

Ceph 16 ("pacific") has a start-up race: a client's first command to the mon
sometimes carries fsid 0 and is refused with EPERM "wrong fsid"; commands are
retried, and the OSD does not update its crush location itself (it exited in 2
of 6 starts otherwise). Measured facts: ../shared/notes/s3 (adapted here).
"""

from __future__ import annotations

import itertools
import json
import shutil
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pvebackup.kit.proc import Child, spawn

__all__ = [
    "RGW", "S3Server", "make_bucket", "missing_tools", "request_counts", "s3_client",
    "start_rgw",
]  # fmt: skip

ACCESS_KEY = "pvebackup-test"
SECRET_KEY = "pvebackup-test-secret-0123456789"
_TOOLS = ("ceph-mon", "ceph-osd", "radosgw", "radosgw-admin", "ceph", "monmaptool")
_START_TIMEOUT = 120.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class S3Server:
    """Where the server listens and the test user's credentials."""

    endpoint: str
    access_key: str
    secret_key: str
    admin_socket: str = ""
    """RGW's admin socket, for :func:`request_counts`."""


class RGW:
    """The three daemons under ``root``; :meth:`stop` ends them by PID."""

    def __init__(self, root: Path, *, block_size: int = 2 << 30) -> None:
        """``block_size``: the OSD's sparse bluestore file (``make bench`` stores
        a few GiB; the tests need less)."""
        self.root = root
        self.block_size = block_size
        self.conf = root / "ceph.conf"
        self.children: list[Child] = []
        self.port = _free_port()
        self.mon_port = _free_port()
        self.server = S3Server(f"http://127.0.0.1:{self.port}", ACCESS_KEY, SECRET_KEY,
                               str(root / "run" / "client.rgw.a.asok"))

    def _ceph(self, *args: str, timeout: float = 30.0) -> str:
        """A ceph CLI command, retried: pacific's first commands may meet 'wrong fsid'."""
        last = ""
        for _ in range(40):
            out = subprocess.run(
                [args[0], "-c", str(self.conf), *args[1:]],
                capture_output=True, text=True, timeout=timeout,
            )  # fmt: skip
            if out.returncode == 0:
                return out.stdout
            last = out.stderr.strip()[-300:]
            time.sleep(0.3)
        raise RuntimeError(f"{' '.join(args)} failed: {last}")

    def _spawn(self, name: str, *argv: str) -> Child:
        log = open(self.root / "log" / f"{name}.out", "ab")  # noqa: SIM115
        try:
            child = spawn([argv[0], "-c", str(self.conf), *argv[1:]], stdout=log, stderr=log)
        finally:
            log.close()
        self.children.append(child)
        return child

    def _write_conf(self) -> None:
        d = self.root
        self.conf.write_text(
            f"""[global]
fsid = {uuid.uuid4()}
mon host = v1:127.0.0.1:{self.mon_port}
public addr = 127.0.0.1
cluster addr = 127.0.0.1
ms bind msgr2 = false
auth cluster required = none
auth service required = none
auth client required = none
run dir = {d}/run
admin socket = {d}/run/$name.asok
log file = {d}/log/$name.log
pid file = {d}/run/$name.pid
keyring = {d}/keyring
mon data = {d}/mon/$cluster-$id
osd data = {d}/osd/$cluster-$id
osd objectstore = bluestore
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 4
osd pool default pgp num = 4
osd pool default pg autoscale mode = off
mon allow pool size one = true
mon allow pool delete = true
mon max pg per osd = 1000
mon warn on pool no redundancy = false
paxos propose interval = 0.05
paxos min wait = 0.01
osd crush chooseleaf type = 0
osd crush update on start = false
osd class update on start = false
bluestore block create = true
bluestore block size = {self.block_size}
bluestore fsck on mount = false
bluestore cache autotune = false
bluestore cache size = 134217728
osd op num shards = 1
osd op num threads per shard = 2
[client.rgw.a]
rgw frontends = beast endpoint=127.0.0.1:{self.port}
rgw data = {d}/rgw
rgw thread pool size = 16
"""
        )

    def start(self) -> S3Server:
        for sub in ("mon", "osd/ceph-0", "run", "log", "rgw"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self._write_conf()
        fsid = self.conf.read_text().split("fsid = ", 1)[1].split("\n", 1)[0]
        c = ["-c", str(self.conf)]
        keyring, monmap = str(self.root / "keyring"), str(self.root / "monmap")
        subprocess.run(
            ["ceph-authtool", "--create-keyring", keyring, "--gen-key", "-n", "mon.",
             "--cap", "mon", "allow *"], check=True, capture_output=True,
        )  # fmt: skip
        subprocess.run(
            # --addv with an explicit v1 address: "--add a IP:PORT" means msgr2
            # for any port but 6789, and the v1-only clients then never get an answer.
            ["monmaptool", "--create", "--addv", "a", f"[v1:127.0.0.1:{self.mon_port}]",
             "--fsid", fsid, monmap], check=True, capture_output=True,
        )  # fmt: skip
        subprocess.run(
            ["ceph-mon", *c, "--mkfs", "-i", "a", "--monmap", monmap, "--keyring", keyring],
            check=True, capture_output=True,
        )  # fmt: skip
        self._spawn("mon", "ceph-mon", "-i", "a", "-f")
        self._ceph("ceph", "--connect-timeout", "30", "-s")
        osd_uuid = str(uuid.uuid4())
        osd_id = self._ceph("ceph", "osd", "new", osd_uuid).strip()
        self._ceph("ceph", "osd", "crush", "add", f"osd.{osd_id}", "1.0", "root=default",
                   "host=localhost")  # fmt: skip
        subprocess.run(
            ["ceph-osd", *c, "-i", osd_id, "--mkfs", "--osd-uuid", osd_uuid],
            check=True, capture_output=True, timeout=120,
        )  # fmt: skip
        osd = self._spawn("osd", "ceph-osd", "-i", osd_id, "-f")
        deadline = time.monotonic() + _START_TIMEOUT
        while f"osd.{osd_id} up" not in self._ceph("ceph", "osd", "dump"):
            if osd.poll() is not None:  # the race killed it: start it again
                self.children.remove(osd)
                osd = self._spawn("osd", "ceph-osd", "-i", osd_id, "-f")
            if time.monotonic() > deadline:
                raise RuntimeError(f"ceph osd did not come up; logs in {self.root}/log")
            time.sleep(0.2)
        rgw = self._spawn("rgw", "radosgw", "-n", "client.rgw.a", "-f")
        while not _answers(self.port):
            if rgw.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"radosgw did not start; logs in {self.root}/log")
            time.sleep(0.2)
        self._ceph("radosgw-admin", "user", "create", "--uid=pvebackup", "--display-name=test",
                   f"--access-key={ACCESS_KEY}", f"--secret={SECRET_KEY}")  # fmt: skip
        return self.server

    def stop(self) -> None:
        for child in reversed(self.children):  # rgw, osd, mon
            child.stop(3.0)  # a test cluster: no clean shutdown needed
        self.children.clear()
        # pytest keeps the last runs' temp dirs: drop the data, keep the logs.
        for sub in ("osd", "mon"):
            shutil.rmtree(self.root / sub, ignore_errors=True)


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def missing_tools() -> list[str]:
    """The Ceph programs RGW needs that are not installed (``make s3deps``)."""
    return [t for t in _TOOLS if shutil.which(t) is None]


def start_rgw(root: Path, *, block_size: int = 2 << 30) -> RGW:
    """A started RGW under ``root`` (stop it with :meth:`RGW.stop`; it is stopped
    here if the start fails)."""
    rgw = RGW(root, block_size=block_size)
    try:
        rgw.start()
    except BaseException:
        rgw.stop()
        raise
    return rgw


_buckets = itertools.count()


def s3_client(server: S3Server, secret_key: str | None = None) -> Any:
    """A plain boto3 client of ``server`` (close it)."""
    from pvebackup.store.backends.s3 import _new_client

    return _new_client(
        endpoint_url=server.endpoint, aws_access_key_id=server.access_key,
        aws_secret_access_key=secret_key or server.secret_key, region_name="us-east-1",
    )  # fmt: skip


def make_bucket(server: S3Server, name: str | None = None) -> str:
    """Create bucket ``name`` (default: a fresh unique name) and return its name."""
    if name is None:
        name = f"t{time.time_ns() % 10**12:x}-{next(_buckets)}"
    client = s3_client(server)
    try:
        client.create_bucket(Bucket=name)
    finally:
        client.close()
    return name


def request_counts(server: S3Server) -> dict[str, int]:
    """The server's request counters since it started (RGW's perf counters):
    ``req`` (every request), ``get`` (GetObject), ``put`` (PutObject). They count
    what every process sent, e.g. a restore's nbdkit plugin too."""
    out = subprocess.run(
        ["ceph", "--admin-daemon", server.admin_socket, "perf", "dump"],
        check=True, capture_output=True, text=True, timeout=30,
    ).stdout  # fmt: skip
    rgw = json.loads(out)["rgw"]
    return {k: int(rgw[k]) for k in ("req", "get", "put")}
