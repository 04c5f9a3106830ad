"""The s3 backend beyond the contract: RGW 16's quirks, hostile keys, secrets."""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import pytest

from pvebackup.api.errors import (
    KeyFileError,
    ObjectNotFoundError,
    PermanentBackendError,
    TransientBackendError,
    UnprotectedKeyFileError,
    UsageError,
)
from pvebackup.store.backends import make_backend
from pvebackup.store.backends.retry import RetryBackend
from pvebackup.store.backends.s3 import S3Backend, S3Config, read_credentials
from s3fixture import S3Server, s3_client

s3 = pytest.mark.s3


def _backend(server: S3Server, bucket: str, **kwargs: object) -> S3Backend:
    return S3Backend(
        S3Config(server.endpoint, bucket, prefix="p"),
        access_key=server.access_key,
        secret_key=server.secret_key,
        **kwargs,  # type: ignore[arg-type]
    )


def _creds(tmp_path: Path, text: str, mode: int = 0o600) -> str:
    path = tmp_path / "s3.cred"
    path.write_text(text)
    path.chmod(mode)
    return str(path)


@s3
def test_rgw16_answers_a_quoted_if_match_with_412(s3_server: S3Server, s3_bucket: str) -> None:
    """Why the backend never sends If-Match: RGW 16 refuses the quoted form every
    client sends, even for the object's own ETag (the day it is fixed, this fails)."""
    client = s3_client(s3_server)
    try:
        etag = client.put_object(Bucket=s3_bucket, Key="k", Body=b"v")["ETag"]
        assert etag.startswith('"')
        with pytest.raises(Exception, match="PreconditionFailed"):
            client.put_object(Bucket=s3_bucket, Key="k", Body=b"w", IfMatch=etag)
    finally:
        client.close()


@s3
def test_rgw16_ignores_if_none_match_on_multipart_completion(
    s3_server: S3Server, s3_bucket: str
) -> None:
    """Why no-clobber puts never go multipart: the condition is ignored there."""
    client = s3_client(s3_server)
    try:
        client.put_object(Bucket=s3_bucket, Key="k", Body=b"old")
        up = client.create_multipart_upload(Bucket=s3_bucket, Key="k")["UploadId"]
        part = client.upload_part(Bucket=s3_bucket, Key="k", UploadId=up, PartNumber=1, Body=b"n")
        done = client.complete_multipart_upload(
            Bucket=s3_bucket, Key="k", UploadId=up, IfNoneMatch="*",
            MultipartUpload={"Parts": [{"ETag": part["ETag"], "PartNumber": 1}]},
        )  # fmt: skip
        assert client.get_object(Bucket=s3_bucket, Key="k")["Body"].read() == b"n"
        assert done.get("ETag", "").strip('"') == ""  # the empty ETag quirk, too
    finally:
        client.close()


@s3
def test_no_clobber_put_of_a_large_object_is_one_conditional_put(
    s3_server: S3Server, s3_bucket: str
) -> None:
    backend = _backend(s3_server, s3_bucket, multipart_threshold=5 << 20, part_size=5 << 20)
    big = os.urandom((5 << 20) + 100)
    assert backend.put("packs/aa/big", big, overwrite=False)
    assert backend.put("packs/aa/big", b"other", overwrite=False) is False
    assert backend.get("packs/aa/big") == big
    assert backend.requests == {"put_object": 2, "get_object": 1}
    backend.close()


@s3
def test_multipart_overwrite_reads_the_empty_etag_with_head(
    s3_server: S3Server, s3_bucket: str
) -> None:
    backend = _backend(s3_server, s3_bucket, multipart_threshold=5 << 20, part_size=5 << 20)
    data = os.urandom(11 << 20)  # parts of 5, 5 and 1 MiB
    assert backend.put("big", data, overwrite=True)
    assert backend.requests["upload_part"] == 3
    assert backend.requests["head_object"] == 1  # the ETag RGW did not send
    assert backend.get("big") == data
    client = s3_client(s3_server)
    try:
        etag = client.head_object(Bucket=s3_bucket, Key="p/big")["ETag"].strip('"')
    finally:
        client.close()
    digests = b"".join(
        hashlib.md5(data[i : i + (5 << 20)]).digest() for i in range(0, len(data), 5 << 20)
    )
    assert etag == f"{hashlib.md5(digests).hexdigest()}-3"
    backend.close()


@s3
def test_planted_keys_that_are_no_backend_keys_are_not_listed(
    s3_server: S3Server, s3_bucket: str
) -> None:
    client = s3_client(s3_server)
    try:
        for key in ("p/packs/../../x", "p/a//b", "p/.hidden", "p/sp ace", "p/ok/key"):
            client.put_object(Bucket=s3_bucket, Key=key, Body=b"x")
        client.put_object(Bucket=s3_bucket, Key="outside", Body=b"x")
    finally:
        client.close()
    backend = _backend(s3_server, s3_bucket)
    assert list(backend.list()) == ["ok/key"]
    assert [k for k, _ in backend.list_info()] == ["ok/key"]
    backend.close()


@s3
def test_list_info_gives_size_and_the_md5_etag_of_a_plain_put(
    s3_server: S3Server, s3_bucket: str
) -> None:
    backend = RetryBackend(_backend(s3_server, s3_bucket))
    backend.put("a/one", b"first", overwrite=False)
    backend.put("a/two", b"second!", overwrite=True)
    infos = dict(backend.list_info("a/"))
    assert {k: (i.size, i.tag) for k, i in infos.items()} == {
        "a/one": (5, hashlib.md5(b"first").hexdigest()),
        "a/two": (7, hashlib.md5(b"second!").hexdigest()),
    }
    assert backend.inner.stat("a/one").tag == infos["a/one"].tag
    backend.close()


@s3
def test_range_past_the_end_of_a_missing_or_present_object(
    s3_server: S3Server, s3_bucket: str
) -> None:
    backend = _backend(s3_server, s3_bucket)
    backend.put("o", b"0123456789", overwrite=False)
    assert backend.get_range("o", 10, 5) == b""  # RGW answers 416 here
    assert backend.get_range("o", 3, 4) == b"3456"
    backend.close()


@s3
def test_a_wrong_secret_is_a_permanent_error_that_does_not_show_it(
    s3_server: S3Server, s3_bucket: str, tmp_path: Path
) -> None:
    secret = "Wrong-Secret-0f1e2d3c4b5a69788796a5b4c3d2e1f0"
    path = _creds(tmp_path, f"[default]\naccess-key = {s3_server.access_key}\n"
                            f"secret-key = {secret}\n")  # fmt: skip
    config = S3Config(s3_server.endpoint, s3_bucket, credentials_file=path)
    backend = make_backend("s3", config.location())
    with pytest.raises(PermanentBackendError) as info:
        backend.put("k", b"v", overwrite=False)
    assert "SignatureDoesNotMatch" in str(info.value) or "403" in str(info.value)
    assert secret not in str(info.value) and secret not in repr(info.value)
    assert secret not in config.location()


def test_credentials_file_must_be_private(tmp_path: Path) -> None:
    path = _creds(tmp_path, "access-key = a\nsecret-key = s\n", mode=0o644)
    with pytest.raises(UnprotectedKeyFileError, match="chmod 600"):
        read_credentials(path)


def test_credentials_file_errors_never_quote_the_file(tmp_path: Path) -> None:
    secret = "TopSecretValue123"
    path = _creds(tmp_path, f"access-key = a\nsecret-ky = {secret}\n")
    with pytest.raises(KeyFileError) as info:
        read_credentials(path)
    assert secret not in str(info.value)
    assert "line 2" in str(info.value)
    path = _creds(tmp_path, f"access-key = a\n{secret}\n")
    with pytest.raises(KeyFileError) as info:
        read_credentials(path)
    assert secret not in str(info.value)
    with pytest.raises(KeyFileError, match="needs both"):
        read_credentials(_creds(tmp_path, "access-key = a\n"))


def test_credentials_file_accepts_aws_names(tmp_path: Path) -> None:
    path = _creds(tmp_path, "aws_access_key_id=AK\naws_secret_access_key = S=K\n")
    assert read_credentials(path) == ("AK", "S=K")


def test_location_round_trips_and_refuses_garbage() -> None:
    config = S3Config("https://s3.example", "b", prefix="x/y", path_style=False, max_requests=3)
    assert S3Config.from_location(config.location()) == config
    for bad in ("", "[]", '{"bucket": 1, "nope": 2}', "{"):
        with pytest.raises(UsageError):
            S3Config.from_location(bad)


def test_invalid_prefix_is_refused() -> None:
    with pytest.raises(PermanentBackendError):
        S3Backend(S3Config("http://127.0.0.1:1", "b", prefix="a/../b"), access_key="a",
                  secret_key="s")  # fmt: skip


def _stubbed() -> S3Backend:
    return S3Backend(S3Config("http://127.0.0.1:1", "b"), access_key="a", secret_key="s")


def _body(data: bytes, length: int | None = None) -> dict[str, object]:
    from botocore.response import StreamingBody

    n = len(data) if length is None else length
    return {"Body": StreamingBody(io.BytesIO(data), n), "ContentLength": n}


def test_a_server_that_ignores_range_is_cut_to_the_range() -> None:
    from botocore.stub import Stubber

    backend = _stubbed()
    data = bytes(range(100))
    with Stubber(backend._client) as stub:  # a 200 with the whole object, no Content-Range
        stub.add_response("get_object", _body(data), {"Bucket": "b", "Key": "k",
                                                      "Range": "bytes=10-14"})  # fmt: skip
        assert backend.get_range("k", 10, 5) == data[10:15]
    backend.close()


def test_a_body_cut_short_is_transient_not_a_short_object() -> None:
    from botocore.stub import Stubber

    backend = _stubbed()
    with Stubber(backend._client) as stub:  # the connection dies after 50 of 100 bytes
        stub.add_response("get_object", _body(b"x" * 50, 100), {"Bucket": "b", "Key": "k"})
        with pytest.raises(TransientBackendError):
            backend.get("k")
    backend.close()


@pytest.mark.parametrize(
    ("status", "code", "error"),
    [
        (503, "SlowDown", TransientBackendError),
        (500, "InternalError", TransientBackendError),
        (429, "TooManyRequests", TransientBackendError),
        (409, "ConditionalRequestConflict", TransientBackendError),
        (403, "AccessDenied", PermanentBackendError),
        (404, "NoSuchBucket", PermanentBackendError),
        (404, "NoSuchKey", ObjectNotFoundError),
    ],
)
def test_error_mapping(status: int, code: str, error: type[Exception]) -> None:
    from botocore.stub import Stubber

    backend = _stubbed()
    with Stubber(backend._client) as stub:
        stub.add_client_error("get_object", code, "m s", status)
        with pytest.raises(error) as info:
            backend.get("k")
    assert type(info.value) is error or issubclass(type(info.value), error)
    if error is PermanentBackendError:
        assert not isinstance(info.value, ObjectNotFoundError)
    backend.close()


def test_an_echoed_secret_is_scrubbed_from_messages() -> None:
    from botocore.stub import Stubber

    backend = _stubbed()  # secret "s" is too short to matter; use a real-looking one
    backend._secret = "EchoedSecretKey0123456789"
    with Stubber(backend._client) as stub:
        stub.add_client_error("get_object", "AccessDenied",
                              "bad key EchoedSecretKey0123456789", 403)  # fmt: skip
        with pytest.raises(PermanentBackendError) as info:
            backend.get("k")
    assert "EchoedSecretKey0123456789" not in str(info.value)
    assert "***" in str(info.value)
    backend.close()
