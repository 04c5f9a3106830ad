"""The RGW fixture itself: one server per session, a fresh bucket per test."""

from __future__ import annotations

import pytest

from s3fixture import S3Server, s3_client

pytestmark = pytest.mark.s3


def test_rgw_answers_with_sigv4_and_a_fresh_bucket(s3_server: S3Server, s3_bucket: str) -> None:
    client = s3_client(s3_server)
    client.put_object(Bucket=s3_bucket, Key="k", Body=b"v")
    assert client.get_object(Bucket=s3_bucket, Key="k")["Body"].read() == b"v"
    assert [o["Key"] for o in client.list_objects_v2(Bucket=s3_bucket)["Contents"]] == ["k"]
    bad = s3_client(s3_server, secret_key="wrong")
    with pytest.raises(Exception, match="SignatureDoesNotMatch"):
        bad.get_object(Bucket=s3_bucket, Key="k")
    client.close()
    bad.close()
