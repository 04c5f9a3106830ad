"""``pvebackup vm-files``: list and extract files of a VM backup, mounting nothing."""

from __future__ import annotations

import argparse
import stat
import sys
from dataclasses import dataclass
from pathlib import Path

from pvebackup.cli.output import add_output_option, print_json
from pvebackup.host.guests import NodeRoot
from pvebackup.host.tasklog import LogRouter
from pvebackup.host.vmfiles import FileInfo, extract_files, list_files, open_guest_filesystem

__all__ = ["VmFilesOptions", "add_parser", "run"]


@dataclass
class VmFilesOptions:
    root: Path
    volid: str
    action: str
    path: str = "/"
    disk: str | None = None
    partition: int | None = None
    target: Path | None = None
    keep_owner: bool = False
    output: str = "text"


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "vm-files",
        help="list or extract files of a VM backup (no mount)",
        description="List (ls) or extract files from a file system on a disk of VM "
        "backup STOREID:VOLNAME. Nothing is mounted in the host kernel: the disk is "
        "read through the provider's restore source by qemu-storage-daemon and the "
        "file system by debugfs (ext2/3/4) or xfs_db (xfs), in userspace: a crafted file "
        "system in a backup cannot reach the kernel's file system drivers. Other file "
        "systems are refused (exit 4). The partition is --partition N, else the first "
        "Linux partition, else the whole disk when it has no partition table. extract "
        "writes the contents of a directory PATH (or the file PATH) into --target, "
        "which is created or must be an empty directory (exit 7 otherwise); names that "
        "would leave it are skipped with a warning, symlinks are written but never "
        "followed, device nodes and sockets are not created, setuid/setgid bits are "
        "dropped and owners are kept only with --keep-owner (as root). A damaged file "
        "system exits 5 (an extraction first writes every entry it can read, and warns "
        "about each one it cannot); a full target exits 12; other codes as in 'pvebackup --help'.",
    )
    p.add_argument("volid", metavar="STOREID:VOLNAME", help="the VM backup")
    p.add_argument("--disk", metavar="DEVICE", help="the disk, e.g. scsi0 (default: the first)")
    p.add_argument("--partition", metavar="N", type=int, help="partition number (1-based)")
    add_output_option(p)
    actions = p.add_subparsers(dest="action", metavar="ls|extract", required=True)
    ls = actions.add_parser("ls", help="list a directory (or show one file)")
    ls.add_argument("path", nargs="?", default="/", metavar="PATH", help="guest path")
    _output_option(ls)
    ex = actions.add_parser("extract", help="extract a directory tree or a file")
    ex.add_argument("path", metavar="PATH", help="guest path")
    ex.add_argument("--target", metavar="DIR", type=Path, required=True,
                    help="new or empty directory to write into")  # fmt: skip
    ex.add_argument("--keep-owner", action="store_true",
                    help="apply the guest's owners (root only)")  # fmt: skip
    _output_option(ex)
    p.set_defaults(command=_from_args, usage_parser=p)


def _output_option(parser: argparse.ArgumentParser) -> None:
    """``--output`` also after the action (``vm-files VOLID ls / --output json``)."""
    parser.add_argument(
        "--output", choices=("text", "json"), default=argparse.SUPPRESS,
        help="output format: text for people, json for scripts (see docs/cli-json.md)",
    )  # fmt: skip


def _from_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    return run(
        VmFilesOptions(
            args.root,
            args.volid,
            args.action,
            args.path,
            args.disk,
            args.partition,
            getattr(args, "target", None),
            getattr(args, "keep_owner", False),
            args.output,
        )
    )


def _shown(name: bytes) -> str:
    return name.decode(errors="backslashreplace")


def _escaped(name: bytes) -> str:
    """A guest's name for a terminal: control characters (and bad UTF-8) escaped,
    so that a name cannot write escape sequences or fake lines."""
    return "".join(
        c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in _shown(name)
    )


def _json(info: FileInfo) -> dict[str, object]:
    return {
        "name": _shown(info.name),
        "type": info.type,
        "mode": info.mode,
        "uid": info.uid,
        "gid": info.gid,
        "size": info.size,
        "inode": info.inode,
        "target": None if info.target is None else _shown(info.target),
    }


def _line(info: FileInfo) -> str:
    kind = {"dir": stat.S_IFDIR, "symlink": stat.S_IFLNK, "fifo": stat.S_IFIFO,
            "socket": stat.S_IFSOCK, "chardev": stat.S_IFCHR,
            "blockdev": stat.S_IFBLK}.get(info.type, stat.S_IFREG)  # fmt: skip
    name = _escaped(info.name)
    if info.target is not None:
        name += " -> " + _escaped(info.target)
    return f"{stat.filemode(kind | info.mode)} {info.uid:>5} {info.gid:>5} {info.size:>12} {name}"


def run(opts: VmFilesOptions) -> int:
    log = LogRouter(sys.stderr)
    root = NodeRoot(opts.root)
    with open_guest_filesystem(
        root, opts.volid, disk=opts.disk, partition=opts.partition, log=log
    ) as fs:
        if opts.action == "ls":
            infos = list_files(fs, opts.path)
            if opts.output == "json":
                print_json([_json(i) for i in infos])
            else:
                for info in infos:
                    print(_line(info))
            return 0
        assert opts.target is not None
        result = extract_files(fs, opts.path, opts.target, keep_owner=opts.keep_owner, log=log)
    if opts.output == "json":
        print_json(
            {
                "volid": opts.volid,
                "disk": fs.disk,
                "partition": None if fs.partition is None else fs.partition.number,
                "path": opts.path,
                "target": str(opts.target),
                "files": result.files,
                "directories": result.directories,
                "symlinks": result.symlinks,
                "bytes": result.bytes,
                "skipped": result.skipped,
            }
        )
    else:
        print(
            f"extracted {result.files} files, {result.directories} directories, "
            f"{result.symlinks} symlinks ({result.bytes} bytes) into {opts.target}"
            + (f"; {len(result.skipped)} skipped" if result.skipped else "")
        )
    return 0
