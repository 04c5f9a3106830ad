"""``pvebackup key show|change-passphrase|paperkey|import-paperkey``: no key or
passphrase ever in stdout, stderr or logs; passphrases from file, env or terminal."""

from __future__ import annotations

import base64
import getpass
import io
import json
import logging
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from pvebackup.api.errors import WrongKeyError
from pvebackup.cli.main import main
from pvebackup.kit.passphrase import PASSPHRASE_FILE_ENV
from pvebackup.providers.store.settings import StoreSettings
from pvebackup.store.keys import create_key_file, load_key_file

OLD, NEW = "old horse battery", "new staple correct"


class FakeTty(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(PASSPHRASE_FILE_ENV, raising=False)
    monkeypatch.setattr("pvebackup.kit.passphrase._typed", {})


class Transcript:
    """Runs commands, keeping all they print; secrets registered must never be in it."""

    def __init__(self, capsys: pytest.CaptureFixture[str]) -> None:
        self.capsys = capsys
        self.secrets: list[str] = []
        self.seen = ""

    def run(self, *argv: str) -> tuple[int, str, str]:
        code = main(list(argv))
        out, err = self.capsys.readouterr()
        self.seen += out + err
        return code, out, err


@pytest.fixture
def cli(
    capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> Iterator[Transcript]:
    caplog.set_level(logging.DEBUG)
    transcript = Transcript(capsys)
    yield transcript
    assert transcript.seen  # something was run and checked
    for s in transcript.secrets:
        assert s not in transcript.seen + caplog.text


def secret_file(tmp_path: Path, name: str, text: str, mode: int = 0o600) -> Path:
    path = tmp_path / name
    path.write_text(text + "\n")
    path.chmod(mode)
    return path


def material_forms(path: Path, passphrase: str) -> list[str]:
    m = load_key_file(path, lambda: passphrase).material
    return [m.hex(), base64.b64encode(m).decode()]


def test_show_never_prints_the_key(tmp_path: Path, cli: Transcript) -> None:
    path = tmp_path / "k.key"
    key = create_key_file(path, None)
    cli.secrets.extend(material_forms(path, ""))
    code, out, _ = cli.run("key", "show", str(path))
    assert code == 0
    assert f"fingerprint: {key.fingerprint}" in out and "kdf:         none" in out
    assert "created:" in out
    assert cli.run("key", "show", "--output", "json", str(path))[0] == 0


def test_show_of_a_protected_key_asks_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "k.key"
    create_key_file(path, OLD, scrypt_n=2**10)
    monkeypatch.setattr("sys.stdin", FakeTty())
    monkeypatch.setattr(getpass, "getpass", lambda p: pytest.fail("asked for a passphrase"))
    assert main(["key", "show", str(path)]) == 0
    assert "scrypt (n=1024, r=8, p=1)" in capsys.readouterr().out


def test_show_keeps_refusing_unprotected_key_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "k.key"
    create_key_file(path, None)
    path.chmod(0o644)
    assert main(["key", "show", str(path)]) == 6
    assert "chmod 600" in capsys.readouterr().err


def test_change_passphrase_with_files(tmp_path: Path, cli: Transcript) -> None:
    path = tmp_path / "k.key"
    key = create_key_file(path, OLD, scrypt_n=2**10)
    cli.secrets.extend([OLD, NEW, *material_forms(path, OLD)])
    old, new = secret_file(tmp_path, "old", OLD), secret_file(tmp_path, "new", NEW)
    argv = ("key", "change-passphrase", str(path), "--passphrase-file", str(old),
            "--new-passphrase-file", str(new))
    code, out, _ = cli.run(*argv)
    assert code == 0 and key.fingerprint in out
    assert load_key_file(path, lambda: NEW) == key
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    code, _, err = cli.run(*argv)
    assert code == 6 and "wrong passphrase" in err  # the old passphrase no longer fits


def test_change_passphrase_on_a_terminal_with_env_file(
    tmp_path: Path, cli: Transcript, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "k.key"
    key = create_key_file(path, OLD, scrypt_n=2**10)
    cli.secrets.extend([OLD, NEW, *material_forms(path, OLD)])
    monkeypatch.setenv(PASSPHRASE_FILE_ENV, str(secret_file(tmp_path, "env", OLD)))
    prompts: list[str] = []
    monkeypatch.setattr("sys.stdin", FakeTty())
    monkeypatch.setattr(getpass, "getpass", lambda p: prompts.append(p) or NEW)
    assert cli.run("key", "change-passphrase", str(path))[0] == 0
    # The current passphrase came from the env file; the new one was asked twice.
    assert prompts == [f"New passphrase for key file {path}: ", "Repeat the new passphrase: "]
    assert load_key_file(path, lambda: NEW) == key


def test_change_passphrase_mismatch_changes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "k.key"
    create_key_file(path, OLD, scrypt_n=2**10)
    before = path.read_bytes()
    answers = iter([NEW, NEW + "x"])
    monkeypatch.setattr("sys.stdin", FakeTty())
    monkeypatch.setattr(getpass, "getpass", lambda p: next(answers))
    assert main(["key", "change-passphrase", str(path)]) == 6
    assert "differ" in capsys.readouterr().err
    assert path.read_bytes() == before


def test_change_passphrase_without_terminal_or_file_says_how(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "k.key"
    create_key_file(path, OLD, scrypt_n=2**10)
    monkeypatch.setattr("sys.stdin", io.StringIO(OLD + "\n"))  # a pipe is never read
    new = secret_file(tmp_path, "new", NEW)
    argv = ["key", "change-passphrase", str(path), "--new-passphrase-file", str(new)]
    assert main(argv) == 6
    err = capsys.readouterr().err
    assert PASSPHRASE_FILE_ENV in err and OLD not in err


def test_env_passphrase_file_with_open_mode_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "k.key"
    create_key_file(path, OLD, scrypt_n=2**10)
    env = secret_file(tmp_path, "env", OLD, mode=0o644)
    monkeypatch.setenv(PASSPHRASE_FILE_ENV, str(env))
    assert main(["key", "change-passphrase", str(path), "--kdf", "none"]) == 6
    err = capsys.readouterr().err
    assert f"chmod 600 {env}" in err and OLD not in err


def test_paperkey_and_import_round_trip(
    tmp_path: Path, cli: Transcript, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "k.key"
    key = create_key_file(path, OLD, scrypt_n=2**10)
    cli.secrets.extend([OLD, *material_forms(path, OLD)])  # a protected key stays wrapped
    code, out, err = cli.run("key", "paperkey", str(path))
    assert code == 0 and "-----BEGIN PVEBACKUP KEY-----" in out and key.fingerprint in out
    assert not err
    monkeypatch.setattr("sys.stdin", io.StringIO(out))
    pw = secret_file(tmp_path, "pw", OLD)
    target = tmp_path / "restored.key"
    code, out, _ = cli.run("key", "import-paperkey", "-", str(target), "--passphrase-file", str(pw))
    assert code == 0 and key.fingerprint in out
    assert load_key_file(target, lambda: OLD) == key


def test_paperkey_of_a_plain_key_warns(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "k.key"
    create_key_file(path, None)
    assert main(["key", "paperkey", str(path)]) == 0
    assert "not protected by a passphrase" in capsys.readouterr().err


def test_create_with_kdf_scrypt_prompts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "k.key"
    monkeypatch.setattr("sys.stdin", FakeTty())
    monkeypatch.setattr(getpass, "getpass", lambda p: NEW)
    assert main(["key", "create", "--kdf", "scrypt", str(path)]) == 0
    assert json.loads(path.read_text())["kdf"]["name"] == "scrypt"
    assert NEW not in capsys.readouterr().out + path.read_text()
    assert load_key_file(path, lambda: NEW).fingerprint


def test_store_key_unlocked_by_env_passphrase_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "k.key"
    key = create_key_file(path, OLD, scrypt_n=2**10)
    settings = StoreSettings.from_scfg({"path": str(tmp_path), "encryption-key": str(path)}, "s")
    monkeypatch.setenv(PASSPHRASE_FILE_ENV, str(secret_file(tmp_path, "env", OLD)))
    assert settings.load_key() == key
    # The storage's own encryption-passphrase-file wins over the environment.
    own = secret_file(tmp_path, "own", "not it")
    scfg = {"path": str(tmp_path), "encryption-key": str(path)}
    with_own = StoreSettings.from_scfg({**scfg, "encryption-passphrase-file": str(own)}, "s")
    with pytest.raises(WrongKeyError, match="wrong passphrase"):
        with_own.load_key()
