"""``pvebackup key create FILE``: make a new encryption key file for a backup-store.

The key is 256 random bits, written to ``FILE`` with mode 0600 (never over an
existing file). With ``--passphrase-file F`` or ``--passphrase-stdin`` it is
wrapped under a key derived from the passphrase with scrypt; the passphrase is
then needed to use the key (storage property ``encryption-passphrase-file``).
Neither the key nor the passphrase is ever printed; the fingerprint is.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from pvebackup.api.errors import KeyFileError
from pvebackup.kit.secretfile import read_secret_file
from pvebackup.store.keys import create_key_file

__all__ = ["KeyCreateOptions", "add_parser", "read_passphrase", "run"]


@dataclass
class KeyCreateOptions:
    """``path``: the new key file; ``passphrase_file``/``passphrase_stdin``: protection."""

    path: Path
    passphrase_file: Path | None = None
    passphrase_stdin: bool = False


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "key",
        help="manage encryption keys of backup-store storages",
        description="Manage encryption keys of backup-store storages.",
    )
    keysub = p.add_subparsers(dest="key_verb", metavar="ACTION", required=True)
    c = keysub.add_parser(
        "create",
        help="create a new random key file",
        description="Create FILE (mode 0600) holding a new random 256-bit key, optionally "
        "protected by a passphrase (scrypt). Refuses to overwrite FILE. A passphrase "
        "file must be private to its owner (chmod 600), as OpenSSH requires of keys. "
        "Exit status 0; 2 on bad arguments; 6 when the key file cannot be written, or "
        "the passphrase is empty or its file unreadable or readable by others.",
    )
    c.add_argument("path", metavar="FILE", type=Path, help="the key file to create")
    g = c.add_mutually_exclusive_group()
    g.add_argument(
        "--passphrase-file",
        metavar="F",
        type=Path,
        help="protect the key with the passphrase in F (first line; F must be mode 0600)",
    )
    g.add_argument(
        "--passphrase-stdin",
        action="store_true",
        help="protect the key with the passphrase read from standard input (first line)",
    )
    c.set_defaults(command=_from_args)


def _from_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    return run(KeyCreateOptions(args.path, args.passphrase_file, args.passphrase_stdin))


def read_passphrase(opts: KeyCreateOptions, stdin: TextIO | None = None) -> str | None:
    """The passphrase the options ask for (first line, newline removed), or None."""
    if opts.passphrase_file is not None:
        raw = read_secret_file(opts.passphrase_file, "passphrase file")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise KeyFileError(
                f"{opts.passphrase_file}: the passphrase file is not UTF-8 text"
            ) from exc
    elif opts.passphrase_stdin:
        text = (stdin or sys.stdin).readline()
    else:
        return None
    passphrase = text.splitlines()[0] if text else ""
    if not passphrase:
        raise KeyFileError("the passphrase is empty")
    return passphrase


def run(opts: KeyCreateOptions, stdin: TextIO | None = None) -> int:
    """Create the key file; prints its path and fingerprint."""
    key = create_key_file(opts.path, read_passphrase(opts, stdin))
    protected = "protected by a passphrase" if opts.passphrase_file or opts.passphrase_stdin else ""
    print(f"created key {opts.path} (fingerprint {key.fingerprint}) {protected}".rstrip())
    return 0
