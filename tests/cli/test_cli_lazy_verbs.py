"""The command line imports only the module of the verb it runs."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import pytest

from pvebackup.cli.main import COMMAND_MODULES, _verb, build_parser


def test_the_verb_table_matches_the_full_parser() -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert sorted(sub.choices) == sorted(COMMAND_MODULES)


@pytest.mark.parametrize(
    ("argv", "verb"),
    [
        (["backup", "100"], "backup"),
        (["--root", "/x", "list", "s"], "list"),
        (["--root=/x", "vm-files", "ls"], "vm-files"),
        (["--root", "backup", "gc", "s"], "gc"),  # "backup" is --root's value here
        (["--help"], None),
        (["--version"], None),
        (["bakcup"], None),
        ([], None),
        (["--root"], None),
    ],
)
def test_verb_is_found_without_a_parser(argv: list[str], verb: str | None) -> None:
    assert _verb(argv) == verb


def test_a_single_verb_parser_parses_like_the_full_one() -> None:
    argv = ["--root", "/r", "backup", "--storage", "s", "--mode", "stop", "100"]
    full = vars(build_parser().parse_args(argv))
    one = vars(build_parser("backup").parse_args(argv))
    for d in (full, one):
        d.pop("usage_parser", None)
    assert full == one


def test_backup_does_not_import_other_commands() -> None:
    code = (
        "import sys\n"
        "from pvebackup.cli.main import main\n"
        "try:\n"
        "    main(['--root', '/nonexistent-root', 'backup', '--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "print(' '.join(m for m in sys.modules if m.startswith('pvebackup.cli.cmd_')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env=dict(os.environ), timeout=120).stdout
    loaded = set(out.splitlines()[-1].split())
    assert "pvebackup.cli.cmd_backup" in loaded
    assert "pvebackup.cli.cmd_vmfiles" not in loaded and "pvebackup.cli.cmd_gc" not in loaded
