"""Fixtures of the store tests."""

from __future__ import annotations

import pytest

from pvebackup.store.keys import EncryptionKey


@pytest.fixture(scope="session")
def key() -> EncryptionKey:
    return EncryptionKey(bytes(range(32)))


@pytest.fixture(scope="session")
def other_key() -> EncryptionKey:
    return EncryptionKey(bytes(range(1, 33)))
