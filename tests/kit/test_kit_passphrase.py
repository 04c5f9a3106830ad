"""Where passphrases come from: file, PVEBACKUP_PASSPHRASE_FILE, terminal; never echoed."""

from __future__ import annotations

import getpass
import io
from pathlib import Path

import pytest

from pvebackup.api.errors import (
    KeyFileError,
    MissingKeyError,
    UnprotectedKeyFileError,
    WrongKeyError,
)
from pvebackup.kit import passphrase as pp


class FakeTty(io.StringIO):
    def isatty(self) -> bool:
        return True


def secret(tmp_path: Path, text: str, mode: int = 0o600, name: str = "pw") -> Path:
    path = tmp_path / name
    path.write_text(text)
    path.chmod(mode)
    return path


def test_named_file_wins_over_env_and_prompt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(pp.PASSPHRASE_FILE_ENV, str(secret(tmp_path, "from env\n", name="env")))
    source = pp.passphrase_source(secret(tmp_path, "from file\nsecond\n"), "k", prompt=None)
    assert source() == "from file"


def test_env_file_is_used_and_follows_the_mode_rule(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = secret(tmp_path, "from env\n")
    monkeypatch.setenv(pp.PASSPHRASE_FILE_ENV, str(env))
    assert pp.passphrase_source(None, "k", prompt=lambda _: "typed")() == "from env"
    env.chmod(0o644)
    with pytest.raises(UnprotectedKeyFileError, match="chmod 600"):
        pp.passphrase_source(None, "k")()


def test_prompt_only_without_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(pp.PASSPHRASE_FILE_ENV, raising=False)
    asked: list[str] = []
    source = pp.passphrase_source(None, "key file k", prompt=lambda q: asked.append(q) or "x")
    assert source() == "x" and asked == ["Passphrase for key file k: "]


def test_no_terminal_no_file_is_a_clear_missing_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(pp.PASSPHRASE_FILE_ENV, raising=False)
    monkeypatch.setattr("sys.stdin", io.StringIO("piped secret\n"))  # never read
    with pytest.raises(MissingKeyError, match=pp.PASSPHRASE_FILE_ENV):
        pp.passphrase_source(None, "k")()


def test_terminal_prompt_uses_getpass_only_on_a_tty(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(getpass, "getpass", lambda prompt: "typed")
    monkeypatch.setattr("sys.stdin", io.StringIO())
    assert pp.terminal_prompt("? ") is None
    monkeypatch.setattr("sys.stdin", FakeTty())
    assert pp.terminal_prompt("? ") == "typed"


def test_terminal_prompt_never_falls_back_to_echo(monkeypatch: pytest.MonkeyPatch) -> None:
    echoed = io.StringIO()

    def fallback(prompt: str) -> str:
        # What getpass does when it cannot turn echo off: warn, then read with echo.
        import warnings

        warnings.warn("Can not control echo", getpass.GetPassWarning, stacklevel=1)
        echoed.write("secret")
        return "secret"

    monkeypatch.setattr(getpass, "getpass", fallback)
    monkeypatch.setattr("sys.stdin", FakeTty())
    assert pp.terminal_prompt("? ") is None
    assert echoed.getvalue() == ""


def test_new_passphrase_asks_twice_and_refuses_a_mismatch() -> None:
    answers = iter(["one", "two"])
    with pytest.raises(WrongKeyError, match="differ"):
        pp.new_passphrase(None, "k", prompt=lambda _: next(answers))
    answers = iter(["same", "same"])
    assert pp.new_passphrase(None, "k", prompt=lambda _: next(answers)) == "same"
    with pytest.raises(KeyFileError, match="empty"):
        pp.new_passphrase(None, "k", prompt=lambda _: "")
    with pytest.raises(MissingKeyError):
        pp.new_passphrase(None, "k", prompt=lambda _: None)


def test_new_passphrase_ignores_the_env_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The env file holds the *current* passphrase; taking it as the new one
    # would make change-passphrase a silent no-op.
    monkeypatch.setenv(pp.PASSPHRASE_FILE_ENV, str(secret(tmp_path, "current\n")))
    with pytest.raises(MissingKeyError):
        pp.new_passphrase(None, "k", prompt=lambda _: None)


@pytest.mark.parametrize("content", [b"\n", b"", b"\xff\xfe\n"])
def test_bad_passphrase_files(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "pw"
    path.write_bytes(content)
    path.chmod(0o600)
    with pytest.raises(KeyFileError):
        pp.read_passphrase_file(path)


def test_a_typed_passphrase_is_asked_once_per_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(pp.PASSPHRASE_FILE_ENV, raising=False)
    monkeypatch.setattr(pp, "_typed", {})
    asked: list[str] = []
    monkeypatch.setattr(getpass, "getpass", lambda prompt: asked.append(prompt) or "typed")
    monkeypatch.setattr("sys.stdin", FakeTty())
    for _ in range(3):  # a job opening its store for each guest
        assert pp.passphrase_source(None, "key file a")() == "typed"
    assert pp.passphrase_source(None, "key file b")() == "typed"
    assert asked == ["Passphrase for key file a: ", "Passphrase for key file b: "]
