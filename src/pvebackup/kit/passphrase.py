"""Where a key's passphrase comes from: a file, ``PVEBACKUP_PASSPHRASE_FILE``, a prompt.

One order everywhere a passphrase is needed (the CLI's ``key`` commands, a
``backup-store`` opening a protected key):

1. a file named explicitly (``--passphrase-file F``, the storage property
   ``encryption-passphrase-file``),
2. the file named by the environment variable ``PVEBACKUP_PASSPHRASE_FILE``,
3. a passphrase handed to this process in memory (:func:`set_process_passphrase`:
   the Proxmox VE bridge helper gets it over its pipe, never from a file),
4. an interactive prompt, only when standard input is a terminal (``getpass``:
   read from the terminal with echo off, never from a pipe); asked once per key
   and process,
5. else :class:`MissingKeyError`, saying these ways.

Passphrase files follow the key files' rule (:mod:`pvebackup.kit.secretfile`:
refused when group or others may access them); the passphrase is their first
line. A passphrase is never part of a message, a repr or a log line.
"""

from __future__ import annotations

import getpass
import os
import sys
import warnings
from collections.abc import Callable

from pvebackup.api.errors import KeyFileError, MissingKeyError, WrongKeyError
from pvebackup.kit.secretfile import read_secret_file

__all__ = [
    "PASSPHRASE_FILE_ENV",
    "new_passphrase",
    "passphrase_source",
    "read_passphrase_file",
    "set_process_passphrase",
    "terminal_prompt",
]

PASSPHRASE_FILE_ENV = "PVEBACKUP_PASSPHRASE_FILE"

Prompt = Callable[[str], "str | None"]

# What was typed at a prompt, per key, for the rest of this process: a backup job
# opens its store once per guest and step, and must not ask every time. Only
# typed answers are kept (files are read again; they may be fixed meanwhile).
_typed: dict[str, str] = {}

# Set once by a process that received the passphrase over a pipe (the bridge
# helper); kept in memory only, never written to a file or the environment.
_process_passphrase: list[str] = []


def set_process_passphrase(passphrase: str | None) -> None:
    """Use ``passphrase`` for every key of this process that has no passphrase
    file (step 3 of the module's order); ``None`` forgets it.

    :raises KeyFileError: ``passphrase`` is empty.
    """
    _process_passphrase.clear()
    if passphrase is None:
        return
    if not passphrase:
        raise KeyFileError("the passphrase is empty")
    _process_passphrase.append(passphrase)


def read_passphrase_file(path: str | os.PathLike[str]) -> str:
    """The first line of the private file ``path``; an empty one is refused.

    :raises UnprotectedKeyFileError: group or others may access ``path``.
    :raises KeyFileError: unreadable, not UTF-8, or an empty first line.
    """
    raw = read_secret_file(path, "passphrase file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise KeyFileError(f"{os.fspath(path)}: the passphrase file is not UTF-8 text") from exc
    passphrase = text.splitlines()[0] if text else ""
    if not passphrase:
        raise KeyFileError(f"{os.fspath(path)}: the passphrase file's first line is empty")
    return passphrase


def terminal_prompt(prompt: str) -> str | None:
    """Ask on the controlling terminal with echo off; None when there is no terminal.

    Only when standard input is a terminal: a job run from cron or with a pipe
    on stdin must fail with a clear message, not wait for input nobody sees.
    getpass falls back to reading *with echo* when it cannot turn echo off; that
    fallback warns first, and the warning is made an error so that a passphrase
    is never echoed.
    """
    try:
        interactive = sys.stdin is not None and sys.stdin.isatty()
    except (OSError, ValueError):
        interactive = False
    if not interactive:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("error", getpass.GetPassWarning)
        try:
            return getpass.getpass(prompt)
        except (getpass.GetPassWarning, EOFError, OSError):
            return None


def passphrase_source(
    path: str | os.PathLike[str] | None,
    what: str,
    *,
    prompt: Prompt | None = None,
) -> Callable[[], str]:
    """A provider of ``what``'s passphrase, following the module's order.

    Nothing is read until it is called (a plain key never needs it). ``prompt``
    replaces the terminal prompt (tests).

    :raises MissingKeyError: (when called) no file named and no terminal.
    """

    def provide() -> str:
        if path is not None:
            return read_passphrase_file(path)
        env = os.environ.get(PASSPHRASE_FILE_ENV)
        if env:
            return read_passphrase_file(env)
        if _process_passphrase:
            return _process_passphrase[0]
        if what in _typed:
            return _typed[what]
        answer = (prompt or terminal_prompt)(f"Passphrase for {what}: ")
        if answer is None:
            raise MissingKeyError(
                f"{what} is protected by a passphrase and none was given: name a"
                f" passphrase file (--passphrase-file, the storage property"
                f" encryption-passphrase-file, or {PASSPHRASE_FILE_ENV}) or run on a terminal"
            )
        if not answer:
            raise KeyFileError("the passphrase is empty")
        if prompt is None:
            _typed[what] = answer
        return answer

    return provide


def new_passphrase(
    path: str | os.PathLike[str] | None,
    what: str,
    *,
    prompt: Prompt | None = None,
) -> str:
    """A new passphrase: from the file ``path``, else asked twice on a terminal.

    ``PVEBACKUP_PASSPHRASE_FILE`` is not used here: it names the passphrase of
    an existing key, and taking it as the new one would silently keep it.

    :raises MissingKeyError: no file and no terminal.
    :raises WrongKeyError: the two answers differ.
    :raises KeyFileError: empty.
    """
    if path is not None:
        return read_passphrase_file(path)
    ask = prompt or terminal_prompt
    first = ask(f"New passphrase for {what}: ")
    if first is None:
        raise MissingKeyError(
            f"a new passphrase for {what} is needed: name a file holding it"
            " (--new-passphrase-file) or run on a terminal"
        )
    if not first:
        raise KeyFileError("the passphrase is empty")
    if ask("Repeat the new passphrase: ") != first:
        raise WrongKeyError("the two passphrases differ; nothing was changed")
    return first
