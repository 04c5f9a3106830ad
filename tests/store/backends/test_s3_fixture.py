"""The RGW fixture itself: one server per session, a fresh bucket per test."""

from __future__ import annotations

import boto3
import pytest

from s3fixture import S3Server

pytestmark = pytest.mark.s3


def _client(server: S3Server):  # type: ignore[no-untyped-def]
    return boto3.client(
        "s3", endpoint_url=server.endpoint, aws_access_key_id=server.access_key,
        aws_secret_access_key=server.secret_key, region_name="us-east-1",
    )  # fmt: skip


def test_rgw_answers_with_sigv4_and_a_fresh_bucket(s3_server: S3Server, s3_bucket: str) -> None:
    client = _client(s3_server)
    client.put_object(Bucket=s3_bucket, Key="k", Body=b"v")
    assert client.get_object(Bucket=s3_bucket, Key="k")["Body"].read() == b"v"
    assert [o["Key"] for o in client.list_objects_v2(Bucket=s3_bucket)["Contents"]] == ["k"]
    bad = boto3.client(
        "s3", endpoint_url=s3_server.endpoint, aws_access_key_id=s3_server.access_key,
        aws_secret_access_key="wrong", region_name="us-east-1",
    )  # fmt: skip
    with pytest.raises(Exception, match="SignatureDoesNotMatch"):
        bad.get_object(Bucket=s3_bucket, Key="k")
    client.close()
    bad.close()
