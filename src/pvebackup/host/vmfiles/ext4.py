"""ext2/3/4 read in userspace with ``debugfs``: never by the host kernel's driver.

``debugfs -c`` opens the image read-only (catastrophic mode: no bitmaps needed)
and runs one request per process. Directories are listed with ``ls -p`` and walked
by inode number (``<N>``), so no name of the guest's is ever parsed as a path by
debugfs; file contents come from ``cat <N>`` on a pipe, which we read and bound
ourselves. debugfs exits 0 also when a request failed, so its stderr decides.

The image is hostile: names may hold any byte but NUL (also ``/`` and newline in
a crafted image), modes and sizes may lie, a directory may list its own ancestor.
Parsing is defensive (records are recognised by their fixed fields, a record that
does not parse ends the listing with an error); what a name may do on the host is
decided by the extraction, not here.
"""

from __future__ import annotations

import re
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

from pvebackup.api.errors import CorruptFilesystemError, ExternalToolError
from pvebackup.api.files import Entry
from pvebackup.kit import proc

__all__ = ["DEBUGFS", "MAX_ENTRIES", "ROOT_INODE", "Entry", "Ext4Reader", "parse_listing"]

DEBUGFS = "debugfs"
ROOT_INODE = 2
TIMEOUT = 300.0
"""Seconds one debugfs request may take."""
MAX_SYMLINK = 4096
MAX_ENTRIES = 1 << 20
"""Most entries one directory may list (a crafted one could list more than memory holds)."""
_CHUNK = 1 << 20

# One ``ls -p`` record: /ino/mode/uid/gid/name/size/ and a newline, where the next
# record (or the end) must follow, so a name holding "/" or a newline stays whole.
_RECORD = re.compile(rb"/(\d+)/([0-7]{6})/(\d+)/(\d+)/(.*?)/(\d*)/\n(?=/\d+/[0-7]{6}/|\n*\Z)", re.S)
_BANNER = re.compile(rb"^debugfs [0-9][^\n]*\n?")
_FAST_LINK = b'Fast link dest: "'


def parse_listing(out: bytes, inode: int) -> list[Entry]:
    """The records of ``debugfs ls -p`` output, without ``.``, ``..`` and unused slots.

    :raises CorruptFilesystemError: a record does not parse, or there are more than
        :data:`MAX_ENTRIES`.
    """
    entries: list[Entry] = []
    pos, end = 0, len(out.rstrip(b"\n"))
    while pos < end:
        m = _RECORD.match(out, pos)
        if m is None:
            raise CorruptFilesystemError(
                f"ext4 file system: unreadable listing of inode {inode} at byte {pos}"
            )
        pos = m.end()
        ino, mode, uid, gid, name, size = m.groups()
        if name in (b".", b"..") or ino == b"0":
            continue  # inode 0: an unused slot (lost+found keeps empty ones)
        if len(entries) >= MAX_ENTRIES:
            raise CorruptFilesystemError(
                f"ext4 file system: directory inode {inode} has more than {MAX_ENTRIES} entries"
            )
        entries.append(Entry(name, int(ino), int(mode, 8), int(uid), int(gid), int(size or b"0")))
    return entries


class Ext4Reader:
    """Requests to ``debugfs`` on one ext2/3/4 image file (read-only)."""

    def __init__(self, image: Path) -> None:
        self.image = image
        self.check()

    def _errors(self, stderr: bytes) -> str:
        return _BANNER.sub(b"", stderr).decode(errors="replace").strip()

    def _run(self, request: str) -> bytes:
        res = proc.run([DEBUGFS, "-c", "-R", request, str(self.image)], timeout=TIMEOUT)
        errors = self._errors(res.stderr)
        if res.returncode != 0 or errors:
            raise CorruptFilesystemError(
                f"ext4 file system: {request.split()[0]} failed: {errors or res.returncode}"
            )
        return res.stdout

    def check(self) -> None:
        """:raises CorruptFilesystemError: debugfs cannot open the file system."""
        res = proc.run([DEBUGFS, "-c", "-R", "stats -h", str(self.image)], timeout=TIMEOUT)
        errors = self._errors(res.stderr)
        if "while trying to open" in errors or "Filesystem not open" in errors:
            raise CorruptFilesystemError(
                f"the ext file system cannot be opened: {errors.splitlines()[0]}"
            )

    def list_dir(self, inode: int) -> list[Entry]:
        """The entries of directory ``inode`` without ``.`` and ``..``."""
        return parse_listing(self._run(f"ls -p <{inode}>"), inode)

    def root(self) -> Entry:
        return Entry(b"/", ROOT_INODE, stat.S_IFDIR | 0o755, 0, 0, 0)

    def readlink(self, entry: Entry) -> bytes:
        """A symbolic link's target (bounded to :data:`MAX_SYMLINK` bytes)."""
        if entry.size > MAX_SYMLINK:
            raise CorruptFilesystemError(
                f"ext4 file system: symbolic link inode {entry.inode} is {entry.size} bytes long"
            )
        info = self._run(f"stat <{entry.inode}>")
        at = info.find(_FAST_LINK)
        if at >= 0:
            # The target is printed raw: its length is the inode's size, not a quote.
            start = at + len(_FAST_LINK)
            return info[start : start + entry.size]
        return b"".join(self.read(entry))

    def read(self, entry: Entry) -> Iterator[bytes]:
        """The contents of a file, in chunks, exactly ``entry.size`` bytes.

        :raises CorruptFilesystemError: debugfs failed or gave more or fewer bytes.
        """
        errpath = self.image.with_name(self.image.name + ".err")
        with open(errpath, "w+b") as errfile:
            child = proc.spawn(
                [DEBUGFS, "-c", "-R", f"cat <{entry.inode}>", str(self.image)],
                stdout=subprocess.PIPE,
                stderr=errfile,
            )
            total = 0
            try:
                assert child.stdout is not None
                while chunk := child.stdout.read(_CHUNK):
                    total += len(chunk)
                    if total > entry.size:
                        # Threat: a file that streams more than its inode says.
                        raise CorruptFilesystemError(
                            f"ext4 file system: inode {entry.inode} holds more than its"
                            f" size ({entry.size} bytes)"
                        )
                    yield chunk
                child.wait(TIMEOUT)
            except subprocess.TimeoutExpired as exc:
                raise ExternalToolError(f"debugfs did not finish in {TIMEOUT:g} s") from exc
            finally:
                child.stop()
            errfile.seek(0)
            errors = self._errors(errfile.read(64 * 1024))
        errpath.unlink(missing_ok=True)
        if errors:
            raise CorruptFilesystemError(
                f"ext4 file system: reading inode {entry.inode} failed: {errors}"
            )
        if total != entry.size:
            raise CorruptFilesystemError(
                f"ext4 file system: inode {entry.inode} gave {total} of {entry.size} bytes"
            )
