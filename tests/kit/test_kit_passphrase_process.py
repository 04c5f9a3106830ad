"""kit.passphrase: a passphrase handed to the process (the bridge's hello)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from pvebackup.api.errors import KeyFileError
from pvebackup.kit.passphrase import PASSPHRASE_FILE_ENV, passphrase_source, set_process_passphrase


@pytest.fixture(autouse=True)
def _forget(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv(PASSPHRASE_FILE_ENV, raising=False)
    yield
    set_process_passphrase(None)


def test_process_passphrase_is_used_without_a_file_and_without_asking() -> None:
    set_process_passphrase("from-the-pipe")
    asked: list[str] = []
    provide = passphrase_source(None, "key", prompt=lambda p: asked.append(p) or "typed")
    assert provide() == "from-the-pipe" and not asked
    set_process_passphrase(None)
    assert provide() == "typed"


def test_a_named_file_still_wins(tmp_path: Path) -> None:
    path = tmp_path / "pass"
    path.write_text("from-file\n")
    path.chmod(0o600)
    set_process_passphrase("from-the-pipe")
    assert passphrase_source(path, "key")() == "from-file"


def test_empty_process_passphrase_is_refused() -> None:
    with pytest.raises(KeyFileError):
        set_process_passphrase("")
