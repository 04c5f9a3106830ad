"""``pvebackup verify``: read and check the backups of a storage, name what is damaged."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from pvebackup.api.errors import (
    IntegrityError,
    PveBackupError,
    UnsupportedError,
    UsageError,
    VolumeNotFoundError,
)
from pvebackup.cli.output import add_output_option, print_json, utc_time
from pvebackup.host.guests import NodeRoot
from pvebackup.kit.annotations import VerifyState
from pvebackup.providers.directory import annotations as dir_annotations
from pvebackup.providers.directory.settings import BackupDirSettings
from pvebackup.providers.directory.verify import verify_volumes
from pvebackup.providers.directory.volumes import VolumeLayout, VolumeName
from pvebackup.providers.store.settings import StoreSettings
from pvebackup.storage import read_storage_config, storage_config
from pvebackup.store import annotations as store_annotations
from pvebackup.store.datastore import Datastore
from pvebackup.store.snapshot import SnapshotId
from pvebackup.store.verify import VerifyReport, verify_store

__all__ = ["VerifyOptions", "add_parser", "run"]


@dataclass
class VerifyOptions:
    root: Path
    target: str
    output: str = "text"
    outdated_after: int | None = None
    now: Callable[[], float] = field(default=time.time)


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
        "Prints each backup as ok or failed, and records that result and the time "
        "beside the backup ('pvebackup list' shows it; advisory only, outside the "
        "signed part: restores check everything they read regardless). With "
        "--outdated-after DAYS, backups verified ok within the last DAYS days are "
        "skipped (a failed or never verified one never is). "
        "Safe while backups run. Exit status 0 when "
        "everything is intact; 5 when anything failed; other codes as listed in "
        "'pvebackup --help'.",
    )
    p.add_argument("target", metavar="STOREID[:VOLNAME]", help="the storage, or one backup in it")
    p.add_argument(
        "--outdated-after",
        type=_days,
        metavar="DAYS",
        help="skip backups verified ok within the last DAYS days",
    )
    add_output_option(p)
    p.set_defaults(command=_from_args, usage_parser=p)


def _days(text: str) -> int:
    if not text.isascii() or not text.isdigit() or len(text) > 6:
        raise argparse.ArgumentTypeError(f"invalid number of days {text[:20]!r}")
    return int(text)


def _from_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    return run(VerifyOptions(args.root, args.target, args.output, args.outdated_after))


@dataclass(frozen=True)
class _Skipped:
    volname: str
    verified: int


def _split_recent(
    opts: VerifyOptions,
    names: Iterable[str],
    state_of: Callable[[str], VerifyState | None],
) -> tuple[list[str], list[_Skipped]]:
    """``names`` to verify, and those verified ok within ``--outdated-after`` days.

    The recorded state is advisory (anyone who can write the storage can forge
    it): at worst a forged "ok" delays this check; ``ok_since`` ignores a time
    in the future, so it cannot delay it for ever.
    """
    if opts.outdated_after is None:
        return list(names), []
    now = opts.now()
    cutoff = now - opts.outdated_after * 86400
    todo: list[str] = []
    skipped: list[_Skipped] = []
    for name in names:
        state = state_of(name)
        if state is not None and state.ok_since(cutoff, now):
            skipped.append(_Skipped(name, state.time))
        else:
            todo.append(name)
    return todo, skipped


def _record(storeid: str, results: Iterable[tuple[str, str]], when: float,
            write: Callable[[str, VerifyState], None]) -> None:  # fmt: skip
    """Record each ``(volname, state)`` verified; a failure to record is a warning only
    (the verdict printed and the exit status are what count)."""
    for volname, state in results:
        if state not in ("ok", "failed"):
            continue
        try:
            write(volname, VerifyState(state, int(when)))
        except (PveBackupError, OSError) as exc:
            print(
                f"warning: {storeid}:{volname}: verify result not recorded: {exc}",
                file=sys.stderr,
            )


def _skipped_lines(skipped: list[_Skipped]) -> list[str]:
    return [f"skipped {s.volname} (verified ok {utc_time(s.verified)})" for s in skipped]


def _skipped_json(storeid: str, skipped: list[_Skipped]) -> list[dict[str, object]]:
    return [{"volid": f"{storeid}:{s.volname}", "verified": s.verified} for s in skipped]


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
        report, skipped = _verify_store(opts, store, chosen)
        _record(
            storeid,
            ((s.volname, s.state) for s in report.snapshots),
            report.started,
            lambda name, state: store_annotations.write_verify_state(
                store, SnapshotId.from_volname(name), state
            ),
        )
    finally:
        store.close()
    if opts.output == "json":
        doc = _json(storeid, report)  # schema: docs/cli-json.md ("verify")
        doc["skipped"] = _skipped_json(storeid, skipped)
        print_json(doc)
    else:
        for line in _skipped_lines(skipped) + report.lines():
            print(line)
    return 0 if report.ok else IntegrityError.exit_code


def _verify_store(
    opts: VerifyOptions, store: Datastore, chosen: list[SnapshotId] | None
) -> tuple[VerifyReport, list[_Skipped]]:
    if opts.outdated_after is None:
        return verify_store(store, chosen), []
    sids = {s.volname: s for s in (store.list_snapshots() if chosen is None else chosen)}
    todo, skipped = _split_recent(
        opts, sids, lambda name: store_annotations.read_verify_state(store, sids[name])
    )
    todo_sids = [sids[name] for name in todo]
    try:
        return verify_store(store, todo_sids), skipped
    except VolumeNotFoundError:
        if chosen is not None:
            raise  # the one asked for does not exist
        # Removed since the listing (a prune beside us): verify the others. It fails
        # while opening manifests, before any chunk is read, so little is redone.
        return verify_store(store, [s for s in todo_sids if store.has_snapshot(s)]), skipped


def _run_dir(opts: VerifyOptions, settings: BackupDirSettings, storeid: str, volname: str) -> int:
    chosen = None
    layout = VolumeLayout(settings.path)
    if volname:
        VolumeName.parse(volname)  # not one of ours: VolumeNotFoundError, as for restore
        chosen = [volname]
    skipped: list[_Skipped] = []
    if opts.outdated_after is not None:
        chosen, skipped = _split_recent(
            opts,
            layout.volnames() if chosen is None else chosen,
            lambda name: dir_annotations.read_verify_state(layout, name),
        )
    try:
        results, started, finished = verify_volumes(layout, chosen)
    except VolumeNotFoundError:
        if volname or chosen is None:
            raise  # the one asked for does not exist
        existing = set(layout.volnames())  # one removed since the listing: not an error
        results, started, finished = verify_volumes(layout, [n for n in chosen if n in existing])
    _record(
        storeid,
        ((r.volname, r.state) for r in results),
        started,
        lambda name, state: dir_annotations.write_verify_state(layout, name, state),
    )
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
                "skipped": _skipped_json(storeid, skipped),
            }
        )
    else:
        for line in _skipped_lines(skipped):
            print(line)
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
