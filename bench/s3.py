"""Ours on S3: full and incremental backup and restore into a real Ceph RGW.

The RGW is started once per ``make bench`` (:func:`pvebackup.testing.rgw.start_rgw`,
the code the tests use), on loopback, and stopped by PID at the end. Each run
gets a fresh bucket, emptied and removed afterwards. Request counts come from the
server (RGW's perf counters through its admin socket), so they cover every process
of a step: the backup CLI, and for a restore the nbdkit plugin reading the bucket.
"""

from __future__ import annotations

from pathlib import Path

from bench.measure import ToolFailed
from bench.ours import OURS_S3, OurNode
from pvebackup.testing.rgw import (
    RGW,
    S3Server,
    make_bucket,
    missing_tools,
    request_counts,
    s3_client,
)

__all__ = ["OURS_S3", "BenchRGW", "S3Node"]

BLOCK_SIZE = 16 << 30  # the OSD's sparse file: a few stores of the 1 GiB image


class BenchRGW:
    """One RGW for the whole benchmark; :meth:`counts` reads its request counters."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.rgw: RGW | None = None

    @staticmethod
    def unavailable() -> str | None:
        missing = missing_tools()
        return f"Ceph RGW not installed (missing {', '.join(missing)}; make s3deps)" \
            if missing else None

    def start(self) -> S3Server:
        self.rgw = RGW(self.root, block_size=BLOCK_SIZE)
        try:
            return self.rgw.start()
        except BaseException:
            self.rgw.stop()
            raise

    def stop(self) -> None:
        if self.rgw is not None:
            self.rgw.stop()

    @property
    def server(self) -> S3Server:
        assert self.rgw is not None
        return self.rgw.server

    def counts(self) -> dict[str, int]:
        """RGW's request counters so far: ``req`` (all), ``get``, ``put``."""
        return request_counts(self.server)

    def bucket_usage(self, bucket: str) -> tuple[int, int]:
        """``(objects, bytes)`` in ``bucket``."""
        client = s3_client(self.server)
        objects = size = 0
        try:
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
                for item in page.get("Contents", ()):
                    objects += 1
                    size += int(item["Size"])
        finally:
            client.close()
        return objects, size

    def remove_bucket(self, bucket: str) -> None:
        client = s3_client(self.server)
        try:
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
                keys = [{"Key": i["Key"]} for i in page.get("Contents", ())]
                if keys:
                    client.delete_objects(Bucket=bucket, Delete={"Objects": keys})
            client.delete_bucket(Bucket=bucket)
        finally:
            client.close()


class S3Node(OurNode):
    """A node whose ``backup-store`` is a bucket on the bench's RGW."""

    def __init__(self, root: Path, rgw: BenchRGW, chunk_size: str | None = None) -> None:
        super().__init__(root, chunk_size)
        self.rgw = rgw
        self.bucket = make_bucket(rgw.server)
        self.cred = root / "s3.cred"

    def storage_cfg(self) -> str:
        server = self.rgw.server
        self.cred.parent.mkdir(parents=True, exist_ok=True)
        self.cred.write_text(f"access-key = {server.access_key}\n"
                             f"secret-key = {server.secret_key}\n")
        self.cred.chmod(0o600)
        text = (
            f"dir: local\n\tpath {self.root}/var/lib/vz\n\tcontent images,rootdir\n\n"
            f"backup-store: store\n\ts3-endpoint {server.endpoint}\n"
            f"\ts3-bucket {self.bucket}\n\ts3-credentials {self.cred}\n"
        )
        if self.chunk_size:
            text += f"\tchunk-size {self.chunk_size}\n"
        return text

    def store_usage(self) -> int:
        return self.rgw.bucket_usage(self.bucket)[1]

    def close(self) -> None:
        try:
            self.rgw.remove_bucket(self.bucket)
        except Exception as exc:  # noqa: BLE001 - a leftover bucket only costs space
            raise ToolFailed(f"cannot remove bucket {self.bucket}: {exc}") from exc
