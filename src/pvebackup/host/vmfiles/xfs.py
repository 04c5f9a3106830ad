"""XFS read in userspace with ``xfs_db -r``: never by the host kernel's driver.

``xfs_db`` lists directories (``ls``, names printed with their length, so a name
holding a newline stays whole), prints inode fields and block maps; the file data
is then read from the image by us, at the byte offsets the block map gives
(``(agno * agblocks + agbno) * blocksize``), every extent checked against the
image's size and the file's. Holes and unwritten extents read as zeros.

xfs_db exits 0 after most failed commands and keeps the previous inode current
after a bad ``inode N`` ("bad inode number"): every answer is checked for the
fields asked, and any such message is :class:`CorruptFilesystemError`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

from pvebackup.api.errors import CorruptFilesystemError
from pvebackup.api.files import Entry
from pvebackup.kit import proc

__all__ = ["XFS_DB", "XfsReader", "parse_ls"]

XFS_DB = "xfs_db"
TIMEOUT = 300.0
BATCH = 256
"""Inodes described per xfs_db run."""
MAX_ENTRIES = 1 << 20
MAX_SYMLINK = 1024  # XFS_SYMLINK_MAXLEN
MAX_EXTENTS = 1 << 20
_CHUNK = 1 << 20
_SYMLINK_HDR = 56  # struct xfs_dsymlink_hdr (v5 file systems)
_SYMLINK_MAGIC = b"XSLM"

# "8   128   directory   0x0000002e   1 . (good)": offset, inode, type, hash, namelen, name.
_LS = re.compile(rb"(\d+) +(\d+) +([a-z]+) +0x[0-9a-f]+ +(\d+) ")
_FIELD = re.compile(rb"^([a-z0-9.]+) = (.*)$", re.M)
_BMAP = re.compile(
    rb"^data offset (\d+) startblock (\d+) \((\d+)/(\d+)\) count (\d+) flag (\d+)$", re.M
)
_BAD = (b"bad inode number", b"not a valid XFS", b"no current", b"not found", b"error")


def parse_ls(out: bytes) -> list[tuple[bytes, int]]:
    """``(name, inode)`` of the records of ``xfs_db ls`` (``.``/``..`` dropped).

    :raises CorruptFilesystemError: a record does not parse.
    """
    found: list[tuple[bytes, int]] = []
    pos = 0
    if out.startswith(b"/") or out.startswith(b"\n"):
        pos = out.find(b"\n") + 1  # a "PATH:" header line when paths were given
    end = len(out.rstrip(b"\n"))
    while pos < end:
        m = _LS.match(out, pos)
        if m is None:
            raise CorruptFilesystemError(f"xfs file system: unreadable listing at byte {pos}")
        length = int(m.group(4))
        name = out[m.end() : m.end() + length]
        rest = m.end() + length
        close = out.find(b"\n", rest)
        close = len(out) if close < 0 else close
        if len(name) != length or not out[rest:close].startswith(b" ("):
            raise CorruptFilesystemError(f"xfs file system: unreadable listing at byte {pos}")
        pos = close + 1
        if name in (b".", b"..") or int(m.group(2)) == 0:
            continue
        if len(found) >= MAX_ENTRIES:
            raise CorruptFilesystemError(f"xfs file system: more than {MAX_ENTRIES} entries")
        found.append((name, int(m.group(2))))
    return found


class XfsReader:
    """Requests to ``xfs_db -r`` on one XFS image file, and reads of its blocks."""

    def __init__(self, image: Path) -> None:
        self.image = image
        self.image_size = os.stat(image).st_size
        out = self._run(["sb 0", "print rootino blocksize agblocks"], what="superblock")
        fields = _fields(out)
        try:
            self.rootino = int(fields[b"rootino"])
            self.blocksize = int(fields[b"blocksize"])
            self.agblocks = int(fields[b"agblocks"])
        except (KeyError, ValueError) as exc:
            raise CorruptFilesystemError("the xfs superblock cannot be read") from exc
        if not 512 <= self.blocksize <= 65536 or self.agblocks <= 0:
            raise CorruptFilesystemError("the xfs superblock holds impossible values")

    def _run(self, commands: Sequence[str], *, what: str) -> bytes:
        argv = [XFS_DB, "-r"]
        for cmd in commands:
            argv += ["-c", cmd]
        res = proc.run([*argv, str(self.image)], timeout=TIMEOUT)
        err = res.stderr.strip()
        if res.returncode != 0 or any(b in err for b in _BAD):
            message = (err or res.stdout[-500:]).decode(errors="replace").strip()
            if "not a valid XFS" in message or what == "superblock":
                raise CorruptFilesystemError(
                    f"the xfs file system cannot be opened: {message.splitlines()[0]}"
                )
            raise CorruptFilesystemError(f"xfs file system: {what} failed: {message}")
        return res.stdout

    def root(self) -> Entry:
        return self._describe([(b"/", self.rootino)])[0]

    def list_dir(self, inode: int) -> list[Entry]:
        out = self._run([f"inode {inode}", "ls"], what=f"listing inode {inode}")
        # Checked at the start only: the rest holds the guest's names.
        if out.startswith(_BAD[0]) or out.startswith(b"no current"):
            raise CorruptFilesystemError(f"xfs file system: bad directory inode {inode}")
        return self._describe(parse_ls(out))

    def _describe(self, named: list[tuple[bytes, int]]) -> list[Entry]:
        entries: list[Entry] = []
        for at in range(0, len(named), BATCH):
            batch = named[at : at + BATCH]
            cmds: list[str] = []
            for _name, ino in batch:
                cmds += [f"inode {ino}", "print core.mode core.uid core.gid core.size"]
            out = self._run(cmds, what="reading inodes")
            if any(b in out for b in _BAD[:1]):
                raise CorruptFilesystemError("xfs file system: a directory names a bad inode")
            values = _FIELD.findall(out)
            if len(values) != 4 * len(batch):
                raise CorruptFilesystemError("xfs file system: unreadable inodes")
            for i, (name, ino) in enumerate(batch):
                got = dict(values[4 * i : 4 * i + 4])
                try:
                    mode = int(got[b"core.mode"], 8)
                    uid, gid = int(got[b"core.uid"]), int(got[b"core.gid"])
                    entries.append(Entry(name, ino, mode, uid, gid, int(got[b"core.size"])))
                except (KeyError, ValueError) as exc:
                    raise CorruptFilesystemError(
                        f"xfs file system: inode {ino} is unreadable"
                    ) from exc
        return entries

    def _extents(self, entry: Entry) -> list[tuple[int, int, int, bool]]:
        """``(file block, image byte offset, blocks, unwritten)``, checked."""
        out = self._run(
            [f"inode {entry.inode}", "print core.format", "bmap"],
            what=f"block map of inode {entry.inode}",
        )
        found: list[tuple[int, int, int, bool]] = []
        for m in _BMAP.finditer(out):
            fileoff, _start, agno, agbno, count, flag = (int(g) for g in m.groups())
            where = (agno * self.agblocks + agbno) * self.blocksize
            # Threat: an extent pointing past the image, or a map of millions of them.
            if agbno >= self.agblocks or where + count * self.blocksize > self.image_size:
                raise CorruptFilesystemError(
                    f"xfs file system: inode {entry.inode} maps blocks outside the disk"
                )
            found.append((fileoff, where, count, flag != 0))
            if len(found) > MAX_EXTENTS:
                raise CorruptFilesystemError(
                    f"xfs file system: inode {entry.inode}: too many extents"
                )
        return sorted(found)

    def readlink(self, entry: Entry) -> bytes:
        if not 0 < entry.size <= MAX_SYMLINK:
            raise CorruptFilesystemError(
                f"xfs file system: symbolic link inode {entry.inode} is {entry.size} bytes long"
            )
        out = self._run([f"inode {entry.inode}", "print core.format"], what="symlink")
        if b"(local)" in out:
            out = self._run([f"inode {entry.inode}", "print u3.symlink"], what="symlink")
            at = out.find(b'u3.symlink = "')
            if at < 0:
                raise CorruptFilesystemError(f"xfs file system: symlink {entry.inode} unreadable")
            start = at + len(b'u3.symlink = "')
            return out[start : start + entry.size]
        data = b""
        with open(self.image, "rb") as f:
            for _off, where, count, _unwritten in self._extents(entry):
                for n in range(count):
                    block = os.pread(f.fileno(), self.blocksize, where + n * self.blocksize)
                    if block[:4] == _SYMLINK_MAGIC:
                        block = block[_SYMLINK_HDR:]
                    data += block
                    if len(data) >= entry.size:
                        return data[: entry.size]
        raise CorruptFilesystemError(f"xfs file system: symlink {entry.inode} is cut short")

    def read(self, entry: Entry) -> Iterator[bytes]:
        bs = self.blocksize
        pos = 0  # bytes of the file handed out so far
        with open(self.image, "rb") as f:
            for fileoff, where, count, unwritten in self._extents(entry):
                start = fileoff * bs
                if start < pos:
                    raise CorruptFilesystemError(
                        f"xfs file system: inode {entry.inode} has overlapping extents"
                    )
                if start >= entry.size:
                    break
                yield from _zeros(min(start, entry.size) - pos)
                pos = start
                length = min(count * bs, entry.size - start)
                done = 0
                while done < length:
                    n = min(_CHUNK, length - done)
                    chunk = bytes(n) if unwritten else os.pread(f.fileno(), n, where + done)
                    if len(chunk) != n:
                        raise CorruptFilesystemError(
                            f"xfs file system: short read of inode {entry.inode}"
                        )
                    done += n
                    yield chunk
                pos += length
        yield from _zeros(entry.size - pos)


def _zeros(n: int) -> Iterator[bytes]:
    while n > 0:
        step = min(n, _CHUNK)
        yield bytes(step)
        n -= step


def _fields(out: bytes) -> dict[bytes, bytes]:
    return dict(_FIELD.findall(out))
