"""``pvebackup key``: encryption key files of backup-store storages.

``create`` makes a new random key file (mode 0600, never over an existing
file); ``show`` tells its fingerprint, creation time and kdf; ``change-passphrase``
re-wraps the same key under a new passphrase (or none); ``paperkey`` prints it as
text for paper, and ``import-paperkey`` turns that text back into a key file.

Passphrases come from ``--passphrase-file``, ``PVEBACKUP_PASSPHRASE_FILE``, or a
prompt on a terminal (echo off), see :mod:`pvebackup.kit.passphrase`. Neither
a key nor a passphrase is ever printed by ``create``, ``show``,
``change-passphrase`` or ``import-paperkey``; the fingerprint is. ``paperkey``
prints the key file itself (still wrapped when protected): that is its purpose.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from pvebackup.api.errors import KeyFileError
from pvebackup.cli.output import add_output_option, print_json
from pvebackup.kit.passphrase import (
    PASSPHRASE_FILE_ENV,
    new_passphrase,
    passphrase_source,
    read_passphrase_file,
)
from pvebackup.store.keys import (
    change_key_passphrase,
    create_key_file,
    import_paperkey,
    key_file_info,
    paperkey_text,
)

__all__ = ["KeyCreateOptions", "add_parser", "read_passphrase", "run"]

_PASSPHRASES = (
    f"A passphrase is read from --passphrase-file F (first line), else from the file "
    f"named by {PASSPHRASE_FILE_ENV}, else asked on the terminal (not echoed). "
    "Passphrase and key files must be private to their owner (chmod 600), as OpenSSH "
    "requires of keys. "
)
_EXIT = (
    "Exit status 0; 2 on bad arguments; 6 on key problems (missing, malformed, "
    "unprotected or unwritable file, wrong or missing passphrase); 7 when another "
    "process changes the key file at the same time."
)


@dataclass
class KeyCreateOptions:
    """``path``: the new key file; ``passphrase_file``/``passphrase_stdin``: protection;
    ``kdf``: ``scrypt`` without a file or stdin asks for the passphrase."""

    path: Path
    passphrase_file: Path | None = None
    passphrase_stdin: bool = False
    kdf: str = "none"
    output: str = "text"


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "key",
        help="manage encryption keys of backup-store storages",
        description="Manage encryption keys of backup-store storages: create, show, "
        "change-passphrase, paperkey, import-paperkey. " + _PASSPHRASES,
    )
    keysub = p.add_subparsers(dest="key_verb", metavar="ACTION", required=True)

    c = keysub.add_parser(
        "create",
        help="create a new random key file",
        description="Create FILE (mode 0600) holding a new random 256-bit key, optionally "
        "protected by a passphrase (scrypt): with --passphrase-file, --passphrase-stdin, "
        "or --kdf scrypt (asked twice on the terminal). Refuses to overwrite FILE. "
        "A passphrase file must be private to its owner (chmod 600). " + _EXIT,
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
    c.add_argument(
        "--kdf",
        choices=("none", "scrypt"),
        default=None,
        help="scrypt: protect the key with a passphrase (asked on the terminal unless "
        "given otherwise); none: store it plain (default without a passphrase option)",
    )
    add_output_option(c)
    c.set_defaults(command=_create_from_args, usage_parser=c)

    s = keysub.add_parser(
        "show",
        help="show a key file's fingerprint, creation time and kdf",
        description="Show the fingerprint, creation time and kdf of key FILE; never the "
        "key, and no passphrase is needed. The fingerprint of a protected key is the one "
        "recorded in the file (checked whenever the key is unlocked); a plain key's is "
        "checked now. " + _EXIT,
    )
    s.add_argument("path", metavar="FILE", type=Path, help="the key file")
    add_output_option(s)
    s.set_defaults(command=_show, usage_parser=s)

    ch = keysub.add_parser(
        "change-passphrase",
        help="protect a key file's key with a new passphrase",
        description="Re-wrap the key in FILE under a new passphrase (or none with --kdf "
        "none). The key and its fingerprint stay the same, so every backup made with it "
        "stays readable; FILE is replaced atomically (mode 0600). "
        + _PASSPHRASES
        + "The new passphrase comes from --new-passphrase-file, else it is asked twice "
        "on the terminal. " + _EXIT,
    )
    ch.add_argument("path", metavar="FILE", type=Path, help="the key file")
    ch.add_argument(
        "--passphrase-file", metavar="F", type=Path, help="the current passphrase (mode 0600)"
    )
    ch.add_argument(
        "--new-passphrase-file", metavar="F", type=Path, help="the new passphrase (mode 0600)"
    )
    ch.add_argument(
        "--kdf",
        choices=("none", "scrypt"),
        default="scrypt",
        help="scrypt (default): protect with the new passphrase; none: store the key plain",
    )
    add_output_option(ch)
    ch.set_defaults(command=_change_passphrase, usage_parser=ch)

    pk = keysub.add_parser(
        "paperkey",
        help="print a key file as text for a paper backup",
        description="Print key FILE as text to keep on paper: a header (fingerprint, "
        "creation time, kdf) and the key file between BEGIN/END lines (no QR code). A "
        "protected key stays wrapped: the paper needs the passphrase too. The text IS the "
        "key: print it, do not keep it where the backups are. Restore it with "
        "'pvebackup key import-paperkey'. " + _EXIT,
    )
    pk.add_argument("path", metavar="FILE", type=Path, help="the key file")
    add_output_option(pk)
    pk.set_defaults(command=_paperkey, usage_parser=pk)

    im = keysub.add_parser(
        "import-paperkey",
        help="make a key file from a paper key",
        description="Read the text 'pvebackup key paperkey' printed (from PAPER, or "
        "standard input with '-'; text around the BEGIN/END block is ignored) and write "
        "it as the new key file FILE (mode 0600, never over an existing file). The key is "
        "checked first (a protected key needs its passphrase), so a mistyped character "
        "is found now, not at the first restore. " + _PASSPHRASES + _EXIT,
    )
    im.add_argument("paper", metavar="PAPER", help="file holding the paper key text, or -")
    im.add_argument("path", metavar="FILE", type=Path, help="the key file to create")
    im.add_argument(
        "--passphrase-file", metavar="F", type=Path, help="the key's passphrase (mode 0600)"
    )
    add_output_option(im)
    im.set_defaults(command=_import_paperkey, usage_parser=im)


def _create_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    kdf = args.kdf
    if kdf == "none" and (args.passphrase_file or args.passphrase_stdin):
        parser.error("--kdf none contradicts a passphrase option")
    opts = KeyCreateOptions(
        args.path,
        args.passphrase_file,
        args.passphrase_stdin,
        kdf or ("scrypt" if args.passphrase_file or args.passphrase_stdin else "none"),
        args.output,
    )
    return run(opts)


def read_passphrase(opts: KeyCreateOptions, stdin: TextIO | None = None) -> str | None:
    """The passphrase the options ask for (first line, newline removed), or None."""
    if opts.passphrase_file is not None:
        return read_passphrase_file(opts.passphrase_file)
    if opts.passphrase_stdin:
        text = (stdin or sys.stdin).readline()
        passphrase = text.splitlines()[0] if text else ""
        if not passphrase:
            raise KeyFileError("the passphrase is empty")
        return passphrase
    if opts.kdf == "scrypt":
        return new_passphrase(None, f"the new key {opts.path}")
    return None


def run(opts: KeyCreateOptions, stdin: TextIO | None = None) -> int:
    """Create the key file; prints its path and fingerprint."""
    passphrase = read_passphrase(opts, stdin)
    key = create_key_file(opts.path, passphrase)
    if opts.output == "json":
        print_json(key_file_info(opts.path).to_json())
        return 0
    protected = "protected by a passphrase" if passphrase is not None else ""
    print(f"created key {opts.path} (fingerprint {key.fingerprint}) {protected}".rstrip())
    return 0


def _show(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    info = key_file_info(args.path)
    if args.output == "json":
        print_json(info.to_json())
        return 0
    kdf = info.kdf
    if info.kdf_params:
        kdf += " (" + ", ".join(f"{k}={v}" for k, v in info.kdf_params.items()) + ")"
    print(f"path:        {info.path}")
    print(
        f"fingerprint: {info.fingerprint}"
        + ("" if info.verified else " (as recorded; checked when unlocked)")
    )
    print(f"created:     {info.created}")
    print(f"kdf:         {kdf}")
    print(f"protected:   {'yes' if info.kdf != 'none' else 'no'}")
    return 0


def _change_passphrase(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    what = f"key file {args.path}"
    if args.kdf == "none":
        if args.new_passphrase_file is not None:
            parser.error("--kdf none takes no --new-passphrase-file")
        new: str | None = None
    else:
        # Asked before the current one is checked; an unreadable or unwanted new
        # passphrase must not be found only after the slow unwrap.
        new = new_passphrase(args.new_passphrase_file, what)
    key = change_key_passphrase(args.path, passphrase_source(args.passphrase_file, what), new)
    if args.output == "json":
        print_json(key_file_info(args.path).to_json())
        return 0
    how = "now protected by the new passphrase" if new is not None else "now stored plain"
    print(f"changed {args.path} (fingerprint {key.fingerprint}): {how}")
    return 0


def _paperkey(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    info = key_file_info(args.path)
    text = paperkey_text(args.path)
    if info.kdf == "none":
        print(
            f"warning: {args.path} is not protected by a passphrase: the paper key holds the"
            " key itself",
            file=sys.stderr,
        )
    if args.output == "json":
        print_json({**info.to_json(), "paperkey": text})
    else:
        sys.stdout.write(text)
        sys.stdout.flush()
    return 0


def _import_paperkey(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if args.paper == "-":
        text = sys.stdin.read(1 << 20)
    else:
        try:
            with open(args.paper, encoding="utf-8", errors="replace") as f:
                text = f.read(1 << 20)
        except OSError as exc:
            raise KeyFileError(f"{args.paper}: cannot read: {exc.strerror or exc}") from exc
    key = import_paperkey(
        text, args.path, passphrase_source(args.passphrase_file, f"the paper key of {args.path}")
    )
    if args.output == "json":
        print_json(key_file_info(args.path).to_json())
        return 0
    print(f"created key {args.path} (fingerprint {key.fingerprint}) from the paper key")
    return 0
