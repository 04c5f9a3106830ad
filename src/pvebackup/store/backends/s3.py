"""A store in an S3 bucket (AWS, Ceph RADOS Gateway, any S3-compatible server).

One object per key, under an optional key prefix (``s3-prefix``): the datastore's
layout is already S3-shaped (no rename, no append, listing by prefix only).

Writes that cannot clobber: ``put(overwrite=False)`` is one ``PutObject`` with
``If-None-Match: *``; the server answers 412 if the key exists, so two writers
inserting the same key both succeed and one of them writes (AWS since 2024, Ceph
RGW 16, SeaweedFS). A server that ignores the header (old MinIO, s3rver) turns it
into a plain overwrite; that is harmless for packs and index objects, whose keys
are the SHA-256 of their bytes, but not for the few mutable keys, so such servers
are not supported (docs/s3.md). Every object is written with one ``PutObject``
(Content-MD5 checked by the server; packs are at most 1 GiB, far below the 5 GiB
single-PUT limit): never multipart for a no-clobber object, because RGW 16 ignores
``If-None-Match`` on ``CompleteMultipartUpload`` (it overwrites). Only an
overwriting put larger than ``multipart_threshold`` goes multipart; RGW 16 then
answers an empty ``ETag``, so the ETag is read with ``HEAD`` and checked against
the parts' MD5s. ``If-Match`` is never sent: RGW 16 answers a quoted ETag (the
form every client sends) with 412.

Listing: ``ListObjectsV2`` pages by prefix, no delimiter; nothing relies on the
order of keys (SeaweedFS lists in tree order) nor on "directories" vanishing
(there are none: a prefix is only a string). Restores read packs with ranged
GETs (``get_range``).

Threat: whoever can write the bucket can plant any key. Listed keys that are not
valid backend keys (``validate_key``) are skipped, never handed to the datastore;
everything read is hostile input to the layers above (checked there).

Errors: 404 on a read is ``ObjectNotFoundError``; 5xx, 429, throttling codes,
connection resets and timeouts are ``TransientBackendError`` (the retry wrapper,
:mod:`.retry`, retries those; botocore's own retries are off so that every retry
is ours, bounded and counted); everything else is ``PermanentBackendError``. The
secret key never appears in a message: boto3 never puts it there, and
:meth:`S3Backend._fail` also scrubs it, should a server echo it.

Concurrency: a boto3 client is thread-safe; at most ``max_requests`` requests are
in flight per backend (a semaphore, and the connection pool has that size).
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
import weakref
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from typing import Any, NoReturn

from pvebackup.api.errors import (
    KeyFileError,
    ObjectNotFoundError,
    PermanentBackendError,
    TransientBackendError,
    UsageError,
)
from pvebackup.kit.optdeps import require
from pvebackup.kit.secretfile import read_secret_file
from pvebackup.store.backends.base import ObjectInfo, check_range, validate_key

__all__ = ["S3Backend", "S3Config", "read_credentials"]

DEFAULT_REGION = "us-east-1"
DEFAULT_MAX_REQUESTS = 8
MULTIPART_THRESHOLD = 1 << 30
PART_SIZE = 64 << 20
_MIN_PART_SIZE = 5 << 20  # S3's minimum for all parts but the last

_TRANSIENT_CODES = frozenset(
    {
        "RequestTimeout", "RequestTimeTooSkewed", "SlowDown", "Throttling",
        "ThrottlingException", "TooManyRequests", "RequestLimitExceeded",
        "InternalError", "ServiceUnavailable", "OperationAborted",
        # AWS: a conditional write raced another one on the same key; retrying
        # gives the definite answer (412 or success).
        "ConditionalRequestConflict",
    }
)  # fmt: skip
_NOT_FOUND_CODES = frozenset({"404", "NoSuchKey", "NotFound"})

_session: Any = None
_session_lock = threading.Lock()


def _new_client(**kwargs: Any) -> Any:
    """A boto3 S3 client from one shared session: a new session loads the service
    model again (0.2 s each); making clients from one session is not thread-safe."""
    global _session
    boto3 = require("boto3", "an S3 backup-store")

    with _session_lock:
        if _session is None:
            _session = boto3.session.Session()
        return _session.client("s3", **kwargs)


class _StatusError(PermanentBackendError):
    """A permanent error with the HTTP status, for the callers that expect one."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True, slots=True)
class S3Config:
    """Where the bucket is and how to reach it (the ``s3-*`` storage properties).

    ``credentials_file`` is a path: the keys themselves are read from it by the
    process that talks to S3, so they never travel in argv or a config file.
    """

    endpoint: str
    bucket: str
    prefix: str = ""
    region: str = DEFAULT_REGION
    path_style: bool = True
    credentials_file: str | None = None
    max_requests: int = DEFAULT_MAX_REQUESTS

    def location(self) -> str:
        """This config as one string (``make_backend("s3", location)``, nbdkit argv)."""
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_location(cls, location: str) -> S3Config:
        """The config :meth:`location` wrote. :raises UsageError: not one."""
        try:
            doc = json.loads(location)
            if not isinstance(doc, dict):
                raise TypeError("not an object")
            return cls(**doc)
        except (ValueError, TypeError) as exc:
            raise UsageError(f"not an s3 backend location: {exc}") from exc


def read_credentials(path: str) -> tuple[str, str]:
    """``(access key, secret key)`` from the 0600 credentials file ``path``.

    Lines ``access-key = ID`` and ``secret-key = SECRET`` (also AWS's names
    ``aws_access_key_id``/``aws_secret_access_key``); ``#`` comments and a
    ``[section]`` line are ignored. Messages never quote the file's content.

    :raises UnprotectedKeyFileError: group or others may read it.
    :raises KeyFileError: unreadable, or a key is missing.
    """
    raw = read_secret_file(path, "S3 credentials file")
    names = {
        "access-key": "access", "aws_access_key_id": "access",
        "secret-key": "secret", "aws_secret_access_key": "secret",
    }  # fmt: skip
    found: dict[str, str] = {}
    for number, line in enumerate(raw.decode("utf-8", "replace").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        name, sep, value = line.partition("=")
        what = names.get(name.strip().lower())
        if not sep or what is None:
            # Not the line itself: it may be the secret with a typo around it.
            raise KeyFileError(f"{path}: line {number}: expected 'access-key = ...' or "
                               "'secret-key = ...'")  # fmt: skip
        found[what] = value.strip()
    if not found.get("access") or not found.get("secret"):
        raise KeyFileError(f"{path}: needs both 'access-key = ...' and 'secret-key = ...'")
    return found["access"], found["secret"]


class S3Backend:
    """A backend over ``config.bucket`` under ``config.prefix``."""

    def __init__(
        self,
        config: S3Config,
        *,
        access_key: str | None = None,
        secret_key: str | None = None,
        multipart_threshold: int = MULTIPART_THRESHOLD,
        part_size: int = PART_SIZE,
    ) -> None:
        from botocore.config import Config

        if access_key is None or secret_key is None:
            if config.credentials_file is None:
                raise UsageError(f"s3 bucket {config.bucket}: no s3-credentials file")
            access_key, secret_key = read_credentials(config.credentials_file)
        prefix = config.prefix.strip("/")
        if prefix:
            validate_key(prefix)
        self.config = config
        self._prefix = f"{prefix}/" if prefix else ""
        self._secret = secret_key
        self._multipart_threshold = multipart_threshold
        self._part_size = max(part_size, _MIN_PART_SIZE)
        self._slots = threading.BoundedSemaphore(max(1, config.max_requests))
        self._count_lock = threading.Lock()
        self._requests: Counter[str] = Counter()
        self._client: Any = _new_client(
            endpoint_url=config.endpoint,
            region_name=config.region or DEFAULT_REGION,
            aws_access_key_id=access_key,
            aws_secret_access_key=secret_key,
            config=Config(
                s3={"addressing_style": "path" if config.path_style else "virtual"},
                # Ours retry (.retry): bounded, only transient errors, counted.
                retries={"total_max_attempts": 1, "mode": "standard"},
                max_pool_connections=max(1, config.max_requests),
                connect_timeout=10,
                read_timeout=60,
                # botocore >= 1.36 adds CRC32 trailers by default, which older
                # servers (RGW 16) do not know; we send Content-MD5 instead.
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
            ),
        )
        # Closes the connection pool when the backend goes (no unclosed sockets).
        self._closer = weakref.finalize(self, self._client.close)

    def __repr__(self) -> str:
        return f"S3Backend({self.config.endpoint!r}, {self.config.bucket!r}, {self._prefix!r})"

    def close(self) -> None:
        """Close the client's connections (the backend cannot be used afterwards)."""
        self._closer()

    @property
    def requests(self) -> dict[str, int]:
        """Requests sent so far, by S3 operation (``put_object``: 12, ...): what a
        cloud provider bills, and what ``make bench`` reports per GiB."""
        with self._count_lock:
            return dict(self._requests)

    # -- plumbing ---------------------------------------------------------

    def _key(self, key: str) -> str:
        return self._prefix + validate_key(key)

    def _call(self, op: str, key: str, **kwargs: Any) -> Any:
        """One request, within the concurrency bound; foreign errors mapped."""
        from botocore.exceptions import BotoCoreError, ClientError

        with self._count_lock:
            self._requests[op] += 1
        with self._slots:
            try:
                return getattr(self._client, op)(Bucket=self.config.bucket, **kwargs)
            except ClientError as exc:
                self._fail_client(op, key, exc)
            except BotoCoreError as exc:
                self._fail(op, key, exc)

    def _scrub(self, text: str) -> str:
        return text.replace(self._secret, "***") if self._secret else text

    def _fail_client(self, op: str, key: str, exc: Any) -> NoReturn:
        err = exc.response.get("Error", {})
        code = str(err.get("Code", ""))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        msg = self._scrub(f"s3 {op} {self.config.bucket}/{self._prefix}{key}: {status} {code}"
                          f" {err.get('Message', '')}".rstrip())  # fmt: skip
        if code in _NOT_FOUND_CODES or (status == 404 and code != "NoSuchBucket"):
            raise ObjectNotFoundError(msg) from None
        if code in _TRANSIENT_CODES or status >= 500 or status == 429:
            raise TransientBackendError(msg) from None
        raise _StatusError(msg, status) from None

    def _fail(self, op: str, key: str, exc: Exception) -> NoReturn:
        from botocore.exceptions import (
            ConnectionClosedError,
            ConnectTimeoutError,
            EndpointConnectionError,
            HTTPClientError,
            IncompleteReadError,
            ReadTimeoutError,
            ResponseStreamingError,
        )

        msg = self._scrub(f"s3 {op} {self.config.bucket}/{self._prefix}{key}: {exc}")
        transient = (
            ConnectionClosedError, ConnectTimeoutError, EndpointConnectionError,
            HTTPClientError, IncompleteReadError, ReadTimeoutError, ResponseStreamingError,
        )  # fmt: skip
        if isinstance(exc, transient):
            raise TransientBackendError(msg) from None
        raise PermanentBackendError(msg) from None

    def _read_body(self, op: str, key: str, response: Mapping[str, Any]) -> bytes:
        from botocore.exceptions import BotoCoreError

        body = response["Body"]
        try:
            with self._slots:
                data: bytes = body.read()
        except BotoCoreError as exc:
            self._fail(op, key, exc)
        except OSError as exc:  # a reset in the middle of the body
            raise TransientBackendError(self._scrub(f"s3 {op} {key}: {exc}")) from None
        finally:
            body.close()
        length = response.get("ContentLength")
        if length is not None and len(data) != length:
            # Threat/fault: a cut connection must not look like a short object.
            raise TransientBackendError(f"s3 {op} {key}: got {len(data)} of {length} bytes")
        return data

    # -- the contract -------------------------------------------------------

    def get(self, key: str) -> bytes:
        response = self._call("get_object", key, Key=self._key(key))
        return self._read_body("get", key, response)

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        check_range(offset, length)
        if length == 0:
            self.stat(key)  # a missing key is still an error
            return b""
        try:
            response = self._call(
                "get_object", key, Key=self._key(key), Range=f"bytes={offset}-{offset + length - 1}"
            )
        except _StatusError as exc:
            if exc.status != 416:
                raise
            # The range starts at or past the end: empty, as a file read there.
            self.stat(key)
            return b""
        data = self._read_body("get_range", key, response)
        if "ContentRange" not in response:
            # A server that ignores Range answers 200 with the whole object.
            return data[offset : offset + length]
        return data[:length]

    def put(self, key: str, data: bytes, *, overwrite: bool, durable: bool = True) -> bool:
        # An S3 PUT is durable when it returns: ``durable`` changes nothing here.
        skey = self._key(key)
        if overwrite and len(data) > self._multipart_threshold:
            self._put_multipart(key, skey, bytes(data))
            return True
        md5 = base64.b64encode(hashlib.md5(data, usedforsecurity=False).digest()).decode()
        extra: dict[str, Any] = {} if overwrite else {"IfNoneMatch": "*"}
        try:
            self._call("put_object", key, Key=skey, Body=bytes(data), ContentMD5=md5, **extra)
        except _StatusError as exc:
            if overwrite or exc.status != 412:
                raise
            return False  # it exists: left alone
        return True

    def _put_multipart(self, key: str, skey: str, data: bytes) -> None:
        """Overwrite ``skey`` in parts; the result's ETag is checked (read with HEAD)."""
        upload = self._call("create_multipart_upload", key, Key=skey)["UploadId"]
        try:
            parts, digests = [], []
            for number, start in enumerate(range(0, len(data), self._part_size), 1):
                part = data[start : start + self._part_size]
                digest = hashlib.md5(part, usedforsecurity=False).digest()
                md5 = base64.b64encode(digest).decode()
                answer = self._call(
                    "upload_part", key, Key=skey, UploadId=upload, PartNumber=number,
                    Body=part, ContentMD5=md5,
                )  # fmt: skip
                parts.append({"ETag": answer["ETag"], "PartNumber": number})
                digests.append(digest)
            done = self._call(
                "complete_multipart_upload", key, Key=skey, UploadId=upload,
                MultipartUpload={"Parts": parts},
            )  # fmt: skip
        except BaseException:
            try:
                self._call("abort_multipart_upload", key, Key=skey, UploadId=upload)
            except Exception:  # noqa: BLE001 - the first error is the one to report
                pass
            raise
        want = f"{hashlib.md5(b''.join(digests), usedforsecurity=False).hexdigest()}-{len(parts)}"
        etag = str(done.get("ETag") or "").strip('"')
        if not etag:
            # RGW 16 answers CompleteMultipartUpload with <ETag></ETag> (Red Hat BZ
            # 2266579); HEAD has the right one.
            etag = str(self._call("head_object", key, Key=skey).get("ETag") or "").strip('"')
        if etag != want:
            raise TransientBackendError(
                f"s3 put {key}: multipart upload stored ETag {etag!r}, expected {want!r}"
            )

    def _head(self, key: str) -> Mapping[str, Any]:
        result: Mapping[str, Any] = self._call("head_object", key, Key=self._key(key))
        return result

    def exists(self, key: str) -> bool:
        try:
            self._head(key)
        except ObjectNotFoundError:
            return False
        return True

    def stat(self, key: str) -> ObjectInfo:
        head = self._head(key)
        return ObjectInfo(
            int(head["ContentLength"]),
            head["LastModified"].timestamp(),
            str(head.get("ETag") or "").strip('"'),
        )

    def delete(self, key: str) -> None:
        try:
            self._call("delete_object", key, Key=self._key(key))
        except ObjectNotFoundError:
            return  # S3 answers 204 for a missing key; some servers 404

    def list(self, prefix: str = "") -> Iterator[str]:
        return (key for key, _ in self.list_info(prefix))

    def list_info(self, prefix: str = "") -> Iterator[tuple[str, ObjectInfo]]:
        """``list`` with each key's size, time and ETag, at no extra request: what
        :mod:`pvebackup.store.catalog` needs to know which cached objects changed."""
        token: str | None = None
        strip = len(self._prefix)
        while True:
            kwargs: dict[str, Any] = {"Prefix": self._prefix + prefix, "MaxKeys": 1000}
            if token is not None:
                kwargs["ContinuationToken"] = token
            page = self._call("list_objects_v2", prefix, **kwargs)
            for item in page.get("Contents", ()):
                key = str(item["Key"])[strip:]
                # Threat: a planted key with "..", "//" or odd bytes is not ours.
                try:
                    validate_key(key)
                except PermanentBackendError:
                    continue
                modified = item.get("LastModified")
                yield key, ObjectInfo(
                    int(item.get("Size", 0)),
                    modified.timestamp() if modified is not None else 0.0,
                    str(item.get("ETag") or "").strip('"'),
                )
            token = page.get("NextContinuationToken")
            if not page.get("IsTruncated") or not token:
                return

    def sync(self) -> None:
        return None  # every put was durable when it returned
