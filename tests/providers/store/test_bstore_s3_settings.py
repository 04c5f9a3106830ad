"""The s3-* properties of backup-store: typed, checked, and secrets kept out."""

from __future__ import annotations

from pathlib import Path

import pytest

from pvebackup.api.errors import StorageConfigError, UnprotectedKeyFileError
from pvebackup.providers.store.settings import StoreSettings
from pvebackup.store.backends.s3 import S3Config

BASE = {
    "s3-endpoint": "http://127.0.0.1:7480",
    "s3-bucket": "pve-backups",
    "s3-credentials": "/etc/pvebackup/s3.cred",
}


def test_s3_properties_become_an_s3_config() -> None:
    scfg = {**BASE, "s3-prefix": "/node1/", "s3-region": "eu-central-1",
            "s3-path-style": "0", "s3-max-requests": "3"}  # fmt: skip
    settings = StoreSettings.from_scfg(scfg, "s3store")
    assert settings.backend == "s3"
    assert settings.s3 == S3Config(
        "http://127.0.0.1:7480", "pve-backups", prefix="node1", region="eu-central-1",
        path_style=False, credentials_file="/etc/pvebackup/s3.cred", max_requests=3,
    )  # fmt: skip
    assert S3Config.from_location(settings.location) == settings.s3


def test_defaults() -> None:
    s3 = StoreSettings.from_scfg(BASE, "s").s3
    assert s3 is not None
    assert (s3.prefix, s3.region, s3.path_style, s3.max_requests) == ("", "us-east-1", True, 8)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"s3-endpoint": "ftp://x"}, "not an http"),
        ({"s3-endpoint": "https://AK:SECRETKEY@s3.example"}, "must not carry credentials"),
        ({"s3-bucket": "Bad_Bucket"}, "not an S3 bucket name"),
        ({"s3-bucket": "a..b"}, "not an S3 bucket name"),
        ({"s3-prefix": "a/../b"}, "not a key prefix"),
        ({"s3-max-requests": "0"}, "s3-max-requests"),
        ({"s3-credentials": "relative/path"}, "absolute"),
        ({"path": "/srv/store"}, "exclude each other"),
        ({"s3-endpoint": None}, "needs s3-endpoint and s3-credentials"),
        ({"s3-credentials": None}, "needs s3-endpoint and s3-credentials"),
        ({"s3-bucket": None}, "need s3-bucket"),
    ],
)
def test_bad_s3_settings_are_refused(change: dict[str, str | None], message: str) -> None:
    scfg = {k: v for k, v in {**BASE, **change}.items() if v is not None}
    with pytest.raises(StorageConfigError, match=message) as info:
        StoreSettings.from_scfg(scfg, "s")
    assert "SECRETKEY" not in str(info.value)


def test_neither_path_nor_bucket_is_refused() -> None:
    with pytest.raises(StorageConfigError, match="needs 'path'"):
        StoreSettings.from_scfg({}, "s")


def test_an_unprotected_credentials_file_is_refused_before_any_request(tmp_path: Path) -> None:
    cred = tmp_path / "s3.cred"
    cred.write_text("access-key = a\nsecret-key = s\n")
    cred.chmod(0o640)
    # Port 1: nothing listens, so any request would fail differently.
    scfg = {**BASE, "s3-endpoint": "http://127.0.0.1:1", "s3-credentials": str(cred)}
    with pytest.raises(UnprotectedKeyFileError):
        StoreSettings.from_scfg(scfg, "s").open(create=True)
