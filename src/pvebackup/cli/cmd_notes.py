"""``pvebackup notes``: show or set the operator's notes on a backup."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from pvebackup.cli.output import add_output_option, print_json
from pvebackup.host.guests import NodeRoot
from pvebackup.kit.annotations import NOTES_MAX, display_text
from pvebackup.storage import lookup, parse_volume_id, read_storage_config, storage_config

__all__ = ["NotesOptions", "add_parser", "run"]


@dataclass
class NotesOptions:
    root: Path
    volid: str
    text: str | None = None
    output: str = "text"


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "notes",
        help="show or set the notes of a backup",
        description="Print the notes of backup STOREID:VOLNAME, or replace them with "
        f"--set TEXT (at most {NOTES_MAX} bytes; newlines and tabs but no other control "
        "characters; --set '' removes them). Notes live beside the backup, outside its "
        "signed part (as on Proxmox Backup Server): whoever can write the storage can "
        "change them, so control characters in stored notes are printed as U+FFFD. "
        "Exit status 0; 2 for notes that cannot be stored; 3 when the backup does not "
        "exist; 4 when the storage's plugin does not support notes; 5 when the stored "
        "notes are too large or not UTF-8; other codes as listed in 'pvebackup --help'.",
    )
    p.add_argument("volid", metavar="STOREID:VOLNAME", help="the backup")
    p.add_argument("--set", dest="text", metavar="TEXT", help="replace the notes with TEXT")
    add_output_option(p)
    p.set_defaults(command=_from_args, usage_parser=p)


def _from_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    return run(NotesOptions(args.root, args.volid, args.text, args.output))


def run(opts: NotesOptions) -> int:
    storeid, volname = parse_volume_id(opts.volid)
    scfg = storage_config(read_storage_config(NodeRoot(opts.root).storage_cfg), storeid)
    plugin = lookup(scfg["type"])
    if opts.text is not None:
        plugin.update_volume_attribute(scfg, storeid, volname, "notes", opts.text)
        notes = opts.text
    else:
        value = plugin.get_volume_attribute(scfg, storeid, volname, "notes")
        notes = value if isinstance(value, str) else ""
    if opts.output == "json":
        # JSON escapes control characters itself: the notes exactly as stored
        print_json({"volid": opts.volid, "notes": notes})
    elif opts.text is None and notes:
        print(display_text(notes).rstrip("\n"))
    elif opts.text is not None:
        print(f"{'set' if notes else 'removed'} the notes of {opts.volid}")
    return 0
