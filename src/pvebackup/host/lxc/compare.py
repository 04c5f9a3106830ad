"""Compare two file trees the way a restore must reproduce them.

Used by the tests and by ``make demo`` to check a restored container against its
source. Compared per path (never following symlinks): presence, file type,
permission bits incl. setuid/setgid/sticky, owner, mtime, file contents, symlink
target, device numbers, xattrs (POSIX ACLs decoded, so that their named ids can
be mapped), and hard link groups (paths sharing an inode within the tree).
atime and ctime are not compared.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Sequence
from pathlib import Path

from pvebackup.api.acl import ACL_XATTRS, map_acl_xattr
from pvebackup.api.idmap import OVERFLOW_ID, IdMapper
from pvebackup.api.types import IdMapEntry

__all__ = ["compare_trees"]


def _scan(root: Path) -> dict[str, os.stat_result]:
    found = {"": os.lstat(root)}
    for dirpath, dirnames, filenames in os.walk(root):
        reldir = os.path.relpath(dirpath, root)
        prefix = "" if reldir == "." else reldir + "/"
        for name in dirnames + filenames:
            found[prefix + name] = os.lstat(os.path.join(dirpath, name))
    return found


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb", opener=lambda p, f: os.open(p, f | os.O_NOFOLLOW)) as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _xattrs(path: Path) -> dict[str, bytes]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return {}
    return {n: os.getxattr(path, n, follow_symlinks=False) for n in sorted(names)}


def _hardlink_groups(tree: dict[str, os.stat_result]) -> dict[str, frozenset[str]]:
    by_inode: dict[tuple[int, int], set[str]] = {}
    for rel, st in tree.items():
        if not stat.S_ISDIR(st.st_mode) and st.st_nlink > 1:
            by_inode.setdefault((st.st_dev, st.st_ino), set()).add(rel)
    return {rel: frozenset(group) for group in by_inode.values() for rel in group}


def compare_trees(
    a: Path,
    b: Path,
    *,
    uid_map: Sequence[IdMapEntry] | None = None,
    mtime_resolution_ns: int = 1,
) -> list[str]:
    """Differences between tree ``a`` and tree ``b``, one readable line each.

    ``uid_map`` (uid and gid entries, as ``lxc.idmap``) says that ``b`` was
    restored from ``a`` into a container with that map: ``a``'s owners (and ACL
    ids) are container ids, ``b``'s are host ids. Without it owners must be equal.
    ``mtime_resolution_ns`` compares mtimes only that precisely (1_000_000_000 for
    archives with whole seconds). An empty list means the trees are the same.
    """
    mapper = IdMapper(uid_map or [])

    def to_host(kind: str, ct_id: int) -> int:
        # As the restore does: an id the map cannot express becomes nobody.
        convert = mapper.ct_to_host_uid if kind == "u" else mapper.ct_to_host_gid
        try:
            return convert(ct_id)
        except ValueError:
            try:
                return convert(OVERFLOW_ID)
            except ValueError:
                return OVERFLOW_ID

    def uid(i: int) -> int:
        return to_host("u", i)

    def gid(i: int) -> int:
        return to_host("g", i)

    tree_a, tree_b = _scan(a), _scan(b)
    diffs = [f"{rel or '.'}: only in {a}" for rel in sorted(tree_a.keys() - tree_b.keys())]
    diffs += [f"{rel or '.'}: only in {b}" for rel in sorted(tree_b.keys() - tree_a.keys())]
    links_a, links_b = _hardlink_groups(tree_a), _hardlink_groups(tree_b)
    for rel in sorted(tree_a.keys() & tree_b.keys()):
        sa, sb = tree_a[rel], tree_b[rel]
        pa, pb = (a / rel, b / rel) if rel else (a, b)
        shown = rel or "."

        def differ(what: str, va: object, vb: object, shown: str = shown) -> None:
            if va != vb:
                diffs.append(f"{shown}: {what} differs: {va!r} != {vb!r}")

        differ("type", stat.filemode(sa.st_mode)[0], stat.filemode(sb.st_mode)[0])
        if stat.S_IFMT(sa.st_mode) != stat.S_IFMT(sb.st_mode):
            continue
        if not stat.S_ISLNK(sa.st_mode):
            differ("mode", oct(stat.S_IMODE(sa.st_mode)), oct(stat.S_IMODE(sb.st_mode)))
        differ(
            "owner",
            (uid(sa.st_uid), gid(sa.st_gid)),
            (sb.st_uid, sb.st_gid),
        )
        differ(
            "mtime",
            sa.st_mtime_ns // mtime_resolution_ns,
            sb.st_mtime_ns // mtime_resolution_ns,
        )
        if stat.S_ISREG(sa.st_mode):
            differ("size", sa.st_size, sb.st_size)
            if sa.st_size == sb.st_size:
                differ("contents", _digest(pa), _digest(pb))
        elif stat.S_ISLNK(sa.st_mode):
            differ("symlink target", os.readlink(pa), os.readlink(pb))
        elif stat.S_ISCHR(sa.st_mode) or stat.S_ISBLK(sa.st_mode):
            differ("device", sa.st_rdev, sb.st_rdev)
        xa, xb = _xattrs(pa), _xattrs(pb)
        for key in ACL_XATTRS:
            if key in xa:
                xa[key] = map_acl_xattr(xa[key], uid, gid)
        differ("xattrs", xa, xb)
        group_a = sorted(links_a.get(rel, frozenset({rel})))
        group_b = sorted(links_b.get(rel, frozenset({rel})))
        differ("hard links", group_a, group_b)
    return diffs
