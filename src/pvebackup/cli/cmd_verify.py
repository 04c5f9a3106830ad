"""``pvebackup verify``: read and check the backups of a storage, name what is damaged."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from pvebackup.api.errors import IntegrityError, UnsupportedError, UsageError
from pvebackup.cli.output import add_output_option, print_json
from pvebackup.host.guests import NodeRoot
from pvebackup.providers.directory.settings import BackupDirSettings
from pvebackup.providers.directory.verify import verify_volumes
from pvebackup.providers.directory.volumes import VolumeLayout, VolumeName
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
        help="read and check the backups of a storage",
        description="Verify every backup in STOREID, or the one backup "
        "STOREID:VOLNAME. backup-store: check each snapshot's manifest and indexes, "
        "and read and check every chunk they use (each chunk once per run, however "
        "many backups share it); a damaged chunk is named and recorded, not moved (it "
        "lives in an immutable pack beside healthy chunks). backup-dir: check each VM "
        "image's header chain, its SHA-256 against the one recorded at backup time, "
        "and run 'qemu-img check' on it; container backups are reported as skipped. "
        "Prints each backup as ok or failed. Safe while backups run. Exit status 0 when "
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
    if scfg.get("type") == "backup-dir":
        return _run_dir(opts, BackupDirSettings.from_scfg(scfg, storeid), storeid, volname)
    if scfg.get("type") != "backup-store":
        raise UnsupportedError(
            f"storage {storeid!r} has type {scfg.get('type')!r}: "
            "verify is for backup-store and backup-dir"
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


def _run_dir(opts: VerifyOptions, settings: BackupDirSettings, storeid: str, volname: str) -> int:
    chosen = None
    if volname:
        VolumeName.parse(volname)  # not one of ours: VolumeNotFoundError, as for restore
        chosen = [volname]
    results, started, finished = verify_volumes(VolumeLayout(settings.path), chosen)
    ok = all(r.state != "failed" for r in results)
    if opts.output == "json":
        print_json(
            {
                "ok": ok,
                "started": int(started),
                "finished": int(finished),
                "chunks": None,
                "bytes": None,
                "bad_chunks": [],
                "snapshots": [
                    {
                        "volid": f"{storeid}:{r.volname}",
                        "state": r.state,
                        "errors": r.errors,
                        "bad_chunks": [],
                    }
                    for r in results
                ],
            }
        )
    else:
        for r in results:
            print(f"{r.state:7} {r.volname}")
            print("".join(f"        {e}\n" for e in r.errors), end="")
        failed = sum(r.state == "failed" for r in results)
        print(
            f"verified {len(results)} backups in {finished - started:.1f}s: "
            + (f"{failed} FAILED" if failed else "ok")
        )
    return 0 if ok else IntegrityError.exit_code


def _json(storeid: str, report: VerifyReport) -> dict[str, object]:
    return {
        "ok": report.ok,
        "started": int(report.started),
        "finished": int(report.finished),
        "chunks": report.chunks,
        "bytes": report.bytes,
        "bad_chunks": [
            {"digest": d, "error": e, "moved_aside": report.moved_aside.get(d, [])}
            for d, e in report.bad_chunks.items()
        ],
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
