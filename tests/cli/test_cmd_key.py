"""``pvebackup key create``: key files, passphrase protection, refusals."""

from __future__ import annotations

import io
import stat
from pathlib import Path

import pytest

from pvebackup.api.errors import MissingKeyError, WrongKeyError
from pvebackup.cli.main import main
from pvebackup.store.keys import load_key_file


def test_create_plain_key_file_0600(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "k.key"
    assert main(["key", "create", str(path)]) == 0
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    key = load_key_file(path)
    out = capsys.readouterr().out
    assert key.fingerprint in out
    assert key.material.hex() not in out and key.material.hex() not in path.read_text()


def test_refuses_to_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "k.key"
    path.write_text("precious")
    assert main(["key", "create", str(path)]) == 6
    assert path.read_text() == "precious"
    assert "refusing to overwrite" in capsys.readouterr().err


def test_passphrase_file_protects_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path, pw = tmp_path / "k.key", tmp_path / "pw"
    pw.write_text("correct horse\n")
    pw.chmod(0o600)
    assert main(["key", "create", "--passphrase-file", str(pw), str(path)]) == 0
    assert "correct horse" not in capsys.readouterr().out + path.read_text()
    with pytest.raises(MissingKeyError):
        load_key_file(path)
    with pytest.raises(WrongKeyError):
        load_key_file(path, lambda: "wrong")
    assert load_key_file(path, lambda: "correct horse").fingerprint


def test_passphrase_stdin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "k.key"
    monkeypatch.setattr("sys.stdin", io.StringIO("s3cret\nignored\n"))
    assert main(["key", "create", "--passphrase-stdin", str(path)]) == 0
    assert load_key_file(path, lambda: "s3cret").fingerprint


def test_empty_passphrase_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "k.key"
    monkeypatch.setattr("sys.stdin", io.StringIO("\n"))
    assert main(["key", "create", "--passphrase-stdin", str(path)]) == 6
    assert not path.exists()


def test_both_passphrase_sources_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["key", "create", "--passphrase-stdin", "--passphrase-file", "x", str(tmp_path / "k")])
    assert exc.value.code == 2


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604])
def test_unprotected_passphrase_file_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], mode: int
) -> None:
    path, pw = tmp_path / "k.key", tmp_path / "pw"
    pw.write_text("correct horse\n")
    pw.chmod(mode)
    assert main(["key", "create", "--passphrase-file", str(pw), str(path)]) == 6
    err = capsys.readouterr().err
    assert f"chmod 600 {pw}" in err and "correct horse" not in err
    assert not path.exists()
