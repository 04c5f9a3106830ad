"""``pvebackup --help`` lists the exit codes of the error tree, generated from it."""

from __future__ import annotations

import re

import pytest

from pvebackup.api import errors
from pvebackup.api.errors import PveBackupError
from pvebackup.cli.main import exit_status_help, main


def _tree() -> list[type[PveBackupError]]:
    return [
        cls for cls in vars(errors).values()
        if isinstance(cls, type) and issubclass(cls, PveBackupError)
    ]  # fmt: skip


def _help(capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    return capsys.readouterr().out.split("exit status:", 1)[1]


def test_help_lists_every_exit_code_of_the_tree(capsys: pytest.CaptureFixture[str]) -> None:
    table = _help(capsys)
    listed = {int(code) for code in re.findall(r"(?m)^  (\d+) ", table)}
    assert listed == {0} | {cls.exit_code for cls in _tree()}
    for cls in _tree():
        if "exit_code" in vars(cls):
            # the meaning, as the class says it (wrapped lines joined again)
            flat = " ".join(table.split())
            assert f"{cls.exit_code} " in flat and cls.summary in flat, cls


def test_a_new_error_class_shows_up_in_the_help(monkeypatch: pytest.MonkeyPatch) -> None:
    # what makes it generated: no table to forget to update
    class QuotaError(PveBackupError):
        exit_code = 42
        summary = "over the storage quota"

    monkeypatch.setattr(errors, "QuotaError", QuotaError, raising=False)
    assert re.search(r"(?m)^  42\s+over the storage quota$", exit_status_help())


def test_each_code_has_its_own_summary() -> None:
    # A class that sets exit_code but no summary would inherit its parent's
    # meaning and the help would describe the code wrongly.
    for cls in _tree():
        if "exit_code" in vars(cls):
            assert "summary" in vars(cls) and cls.summary.strip(), cls
        else:
            assert "summary" not in vars(cls), f"{cls.__name__}: summary without its own code"


def test_module_docstring_tree_names_every_class_and_code() -> None:
    doc = errors.__doc__ or ""
    for cls in _tree():
        line = next((ln for ln in doc.splitlines() if re.search(rf"\b{cls.__name__}\b", ln)), None)
        assert line is not None, f"{cls.__name__} missing from the tree in api/errors.py"
        if "exit_code" in vars(cls):
            assert re.search(rf"\bexit {cls.exit_code}\b", line), line
