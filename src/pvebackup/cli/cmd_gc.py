"""``pvebackup gc``: free the space of removed and crashed backups in a backup-store."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from pathlib import Path

from pvebackup.api.errors import UnsupportedError
from pvebackup.cli.output import add_output_option, print_json
from pvebackup.host.guests import NodeRoot
from pvebackup.providers.store.settings import StoreSettings
from pvebackup.storage import read_storage_config, storage_config
from pvebackup.store.gc import collect_garbage

__all__ = ["GcOptions", "add_parser", "run"]


@dataclass
class GcOptions:
    root: Path
    storage: str
    dry_run: bool = False
    output: str = "text"


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "gc",
        help="free unused space in a backup-store storage",
        description="Garbage-collect STOREID (type backup-store), safe while backups run "
        "into it, from this or other processes. Chunks that no snapshot uses any more "
        "(after 'pvebackup remove', or left by a crashed backup) are condemned by one "
        "run and deleted by a later run, once every backup that was running when they "
        "were condemned has ended: run gc regularly (e.g. daily). Packs with more than "
        "10%% unused bytes are rewritten. --dry-run reports what would be done and "
        "changes nothing. Exit status 0, or a code as listed in 'pvebackup --help'.",
    )
    p.add_argument("storage", metavar="STOREID", help="the backup-store storage")
    p.add_argument("--dry-run", action="store_true", help="report only, change nothing")
    add_output_option(p)
    p.set_defaults(command=_from_args, usage_parser=p)


def _from_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    return run(GcOptions(args.root, args.storage, args.dry_run, args.output))


def run(opts: GcOptions) -> int:
    cfg = read_storage_config(NodeRoot(opts.root).storage_cfg)
    scfg = storage_config(cfg, opts.storage)
    if scfg.get("type") != "backup-store":
        raise UnsupportedError(
            f"storage {opts.storage!r} has type {scfg.get('type')!r}: gc is for backup-store"
        )
    store = StoreSettings.from_scfg(scfg, opts.storage).open()
    report = collect_garbage(store, dry_run=opts.dry_run)
    if opts.output == "json":
        print_json(dataclasses.asdict(report))  # schema: docs/cli-json.md ("gc")
        return 0
    for line in report.lines():
        print(line)
    return 0
