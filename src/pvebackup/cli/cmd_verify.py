"""``pvebackup verify``: read and check the backups of a storage, name what is damaged."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from pvebackup.api.errors import IntegrityError, UnsupportedError, UsageError
from pvebackup.cli.output import add_output_option, print_json
from pvebackup.host.guests import NodeRoot
from pvebackup.providers.store.settings import StoreSettings
from pvebackup.storage import read_storage_config, storage_config
from pvebackup.store.snapshot import SnapshotId
from pvebackup.store.verify import VerifyReport, verify_store

__all__ = ["VerifyOptions", "add_parser", "run"]


@dataclass
class VerifyOptions:
    root: Path
    target: str
    output: str = "text"


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "verify",
        help="read and check the backups of a backup-store storage",
        description="Verify every backup in STOREID (type backup-store), or the one "
        "backup STOREID:VOLNAME: check each snapshot's manifest and indexes, and read "
        "and check every chunk they use (each chunk once per run, however many "
        "backups share it). Prints each backup as ok or failed, naming the damaged "
        "chunks; a damaged chunk is recorded, not moved (it lives in an immutable "
        "pack beside healthy chunks). Safe while backups run. Exit status 0 when "
        "everything is intact; 5 when anything failed; other codes as listed in "
        "'pvebackup --help'.",
    )
    p.add_argument("target", metavar="STOREID[:VOLNAME]", help="the storage, or one backup in it")
    add_output_option(p)
    p.set_defaults(command=_from_args, usage_parser=p)


def _from_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    return run(VerifyOptions(args.root, args.target, args.output))


def run(opts: VerifyOptions) -> int:
    storeid, _, volname = opts.target.partition(":")
    cfg = read_storage_config(NodeRoot(opts.root).storage_cfg)
    scfg = storage_config(cfg, storeid)
    if scfg.get("type") != "backup-store":
        raise UnsupportedError(
            f"storage {storeid!r} has type {scfg.get('type')!r}: verify is for backup-store"
        )
    chosen = None
    if volname:
        try:
            chosen = [SnapshotId.from_volname(volname)]
        except ValueError as exc:
            raise UsageError(f"{opts.target!r} names no backup of a backup-store") from exc
    store = StoreSettings.from_scfg(scfg, storeid).open()
    try:
        report = verify_store(store, chosen)
    finally:
        store.close()
    if opts.output == "json":
        print_json(_json(storeid, report))  # schema: docs/cli-json.md ("verify")
    else:
        for line in report.lines():
            print(line)
    return 0 if report.ok else IntegrityError.exit_code


def _json(storeid: str, report: VerifyReport) -> dict[str, object]:
    return {
        "ok": report.ok,
        "started": int(report.started),
        "finished": int(report.finished),
        "chunks": report.chunks,
        "bytes": report.bytes,
        "bad_chunks": [{"digest": d, "error": e} for d, e in report.bad_chunks.items()],
        "snapshots": [
            {
                "volid": f"{storeid}:{s.volname}",
                "state": s.state,
                "errors": s.errors,
                "bad_chunks": s.bad_chunks,
            }
            for s in report.snapshots
        ],
    }
