"""Unprivileged restores run in the container's user namespace: the kernel is the judge.

Every test here goes through the real helper process (pvebackup.host.lxc.nschild)
with the default Proxmox VE map (container 0..65535 = host 100000..165535) or the
pass-through map of lxc_fixtures, and checks what lands on the host's disk.
"""

from __future__ import annotations

import io
import os
import signal
import stat
import struct
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
from lxc_fixtures import PASSTHROUGH_MAP, LogRecorder

from pvebackup.api.errors import (
    GuestConfigError,
    IntegrityError,
    PveBackupError,
    UnsafeArchiveError,
)
from pvebackup.api.idmap import DEFAULT_UNPRIVILEGED_MAP, parse_lxc_idmap
from pvebackup.host.lxc import userns
from pvebackup.host.lxc.restore import copy_directory, extract_tar
from pvebackup.host.lxc.writer import SafeTreeWriter

DEFAULT_MAP = list(DEFAULT_UNPRIVILEGED_MAP)
CT_ROOT = 100000
CAP_SETUID = 7
# struct vfs_cap_data, revision 2: magic|effective, then permitted/inheritable
# of the low and high 32 capabilities. Valid in every user namespace: host-wide.
CAP_V2_SETUID = struct.pack("<IIIII", 0x02000001, 1 << CAP_SETUID, 0, 0, 0)


def add(tf: tarfile.TarFile, name: str, kind: bytes = tarfile.REGTYPE, *,
        data: bytes = b"", mode: int = 0o644, uid: int = 0, gid: int = 0,
        linkname: str = "", dev: tuple[int, int] = (0, 0),
        xattrs: dict[str, bytes] | None = None) -> None:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode, info.uid, info.gid = mode, uid, gid
    info.linkname = linkname
    info.devmajor, info.devminor = dev
    info.pax_headers = {
        f"SCHILY.xattr.{k}": v.decode("utf-8", "surrogateescape")
        for k, v in (xattrs or {}).items()
    }
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    tf.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def target_dir(tmp_path: Path) -> Path:
    target = tmp_path / "target"
    target.mkdir()
    return target


def getfattr_hex(path: Path, name: str) -> str | None:
    """The xattr as the real getfattr shows it (hex), None when absent."""
    proc = subprocess.run(
        ["getfattr", "--absolute-names", "-n", name, "-e", "hex", str(path)],
        capture_output=True, text=True, check=False,
    )
    if proc.returncode != 0:
        assert "No such attribute" in proc.stderr, proc.stderr
        return None
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith(name + "="))
    return line.split("=", 1)[1]


def test_v2_capability_becomes_v3_bound_to_the_container_root(
    tmp_path: Path, log: LogRecorder
) -> None:
    archive = tmp_path / "caps.tar"
    with tarfile.open(archive, "w", format=tarfile.PAX_FORMAT) as tf:
        add(tf, "bin/evil", data=b"#!/bin/sh\n", mode=0o755,
            xattrs={"security.capability": CAP_V2_SETUID})
    target = target_dir(tmp_path)
    extract_tar(archive, {"/": target}, DEFAULT_MAP, log=log)
    got = getfattr_hex(target / "bin/evil", "security.capability")
    # revision 3, effective; permitted = cap_setuid; rootid = the container's root
    # on the host: the capability is void for host users.
    want = struct.pack("<IIIIII", 0x03000001, 1 << CAP_SETUID, 0, 0, 0, CT_ROOT)
    assert got == "0x" + want.hex()
    getcap = subprocess.run(["getcap", "-n", str(target / "bin/evil")],
                            capture_output=True, text=True, check=False)
    if getcap.returncode == 0:  # libcap2-bin present
        assert f"rootid={CT_ROOT}" in getcap.stdout


def test_privileged_restore_keeps_v2_capability(tmp_path: Path, log: LogRecorder) -> None:
    archive = tmp_path / "caps.tar"
    with tarfile.open(archive, "w", format=tarfile.PAX_FORMAT) as tf:
        add(tf, "ping", data=b"x", mode=0o755, xattrs={"security.capability": CAP_V2_SETUID})
    target = target_dir(tmp_path)
    extract_tar(archive, {"/": target}, [], log=log)
    assert getfattr_hex(target / "ping", "security.capability") == "0x" + CAP_V2_SETUID.hex()


@pytest.mark.parametrize("mechanism", ["tar", "directory"])
def test_device_nodes_are_skipped_with_a_warning(
    tmp_path: Path, log: LogRecorder, mechanism: str
) -> None:
    target = target_dir(tmp_path)
    if mechanism == "tar":
        source = tmp_path / "dev.tar"
        with tarfile.open(source, "w", format=tarfile.PAX_FORMAT) as tf:
            add(tf, "dev", tarfile.DIRTYPE, mode=0o755)
            add(tf, "dev/sda", tarfile.BLKTYPE, mode=0o666, dev=(8, 0))
            add(tf, "dev/mem", tarfile.CHRTYPE, mode=0o666, dev=(1, 1))
            add(tf, "dev/disk", tarfile.LNKTYPE, linkname="dev/sda")
            add(tf, "dev/fifo", tarfile.FIFOTYPE, mode=0o600)
            add(tf, "etc/hostname", data=b"ct\n")
        extract_tar(source, {"/": target}, DEFAULT_MAP, log=log)
    else:
        source = tmp_path / "tree"
        (source / "dev").mkdir(parents=True)
        (source / "etc").mkdir()
        os.mknod(source / "dev/sda", stat.S_IFBLK | 0o666, os.makedev(8, 0))
        os.link(source / "dev/sda", source / "dev/disk")
        os.mknod(source / "dev/mem", stat.S_IFCHR | 0o666, os.makedev(1, 1))
        os.mkfifo(source / "dev/fifo", 0o600)
        (source / "etc/hostname").write_text("ct\n")
        copy_directory(source, {"/": target}, DEFAULT_MAP, log=log)
    assert sorted(p.name for p in (target / "dev").iterdir()) == ["fifo"]
    assert (target / "etc/hostname").read_text() == "ct\n"
    warnings = log.warnings()
    assert len(warnings) == 3, warnings  # one per refused file, naming it
    assert any(w.startswith("dev/mem: device node 1:1 not restored") for w in warnings)
    # dev/sda and its hard link dev/disk: whichever comes first is the node.
    assert {w.split(":")[0] for w in warnings} == {"dev/sda", "dev/disk", "dev/mem"}
    assert sum("device node 8:0 not restored" in w for w in warnings) == 1


def test_setuid_only_on_owners_the_map_has(tmp_path: Path, log: LogRecorder) -> None:
    archive = tmp_path / "suid.tar"
    with tarfile.open(archive, "w", format=tarfile.PAX_FORMAT) as tf:
        add(tf, "stranger", data=b"x", mode=0o6755, uid=70000, gid=70001)
        add(tf, "mapped", data=b"x", mode=0o6755, uid=1000, gid=5)
    target = target_dir(tmp_path)
    extract_tar(archive, {"/": target}, PASSTHROUGH_MAP, log=log)
    st = (target / "stranger").stat()
    # uid 70000 is not in the map: the container's nobody, and no setuid/setgid.
    assert (st.st_uid, st.st_gid) == (CT_ROOT + 65534, CT_ROOT + 65534)
    assert stat.S_IMODE(st.st_mode) == 0o755
    st = (target / "mapped").stat()
    assert (st.st_uid, st.st_gid) == (1000, CT_ROOT + 5)  # pass-through uid 1000
    assert stat.S_IMODE(st.st_mode) == 0o6755
    warnings = "\n".join(log.warnings())
    assert "setuid bit dropped" in warnings and "setgid bit dropped" in warnings


def test_host_only_xattrs_are_refused_by_the_kernel(tmp_path: Path, log: LogRecorder) -> None:
    archive = tmp_path / "x.tar"
    with tarfile.open(archive, "w", format=tarfile.PAX_FORMAT) as tf:
        add(tf, "f", data=b"x", xattrs={"trusted.overlay.opaque": b"y", "user.ok": b"1"})
    target = target_dir(tmp_path)
    extract_tar(archive, {"/": target}, DEFAULT_MAP, log=log)
    assert os.listxattr(target / "f") == ["user.ok"]
    assert any("trusted.overlay.opaque" in w for w in log.warnings())


def test_target_root_belongs_to_the_container_root(tmp_path: Path, log: LogRecorder) -> None:
    archive = tmp_path / "noroot.tar"
    with tarfile.open(archive, "w", format=tarfile.PAX_FORMAT) as tf:
        add(tf, "etc/hostname", data=b"ct\n")  # no "." entry
    target = target_dir(tmp_path)
    extract_tar(archive, {"/": target}, DEFAULT_MAP, log=log)
    assert (target.stat().st_uid, target.stat().st_gid) == (CT_ROOT, CT_ROOT)
    assert (target / "etc").stat().st_uid == CT_ROOT


def test_errors_come_back_typed(tmp_path: Path, log: LogRecorder) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    archive = tmp_path / "evil.tar"
    with tarfile.open(archive, "w", format=tarfile.PAX_FORMAT) as tf:
        add(tf, "link", tarfile.SYMTYPE, linkname=str(outside))
        add(tf, "link/evil", data=b"x")
    with pytest.raises(UnsafeArchiveError) as info:
        extract_tar(archive, {"/": target_dir(tmp_path)}, DEFAULT_MAP, log=log)
    assert info.value.exit_code == 8
    assert "link" in str(info.value)
    assert list(outside.iterdir()) == []

    corrupt = tmp_path / "bad.tar.zst"
    corrupt.write_bytes(b"\x28\xb5\x2f\xfd" + b"\x00" * 600)
    other = tmp_path / "t2"
    other.mkdir()
    with pytest.raises(IntegrityError):
        extract_tar(corrupt, {"/": other}, DEFAULT_MAP, log=log)


def test_map_without_container_root_is_refused(tmp_path: Path, log: LogRecorder) -> None:
    archive = tmp_path / "a.tar"
    with tarfile.open(archive, "w") as tf:
        add(tf, "f", data=b"x")
    target = target_dir(tmp_path)
    no_root = [parse_lxc_idmap("u 1 100001 10"), parse_lxc_idmap("g 0 100000 10")]
    with pytest.raises(GuestConfigError, match="not mapped"):
        extract_tar(archive, {"/": target}, no_root, log=log)
    assert target.stat().st_uid == 0 and not (target / "f").exists()


def test_writer_refuses_a_map_outside_its_namespace(tmp_path: Path, log: LogRecorder) -> None:
    # In this (host) process the kernel's map is the identity: writing container
    # ids here would give the container's files to host users.
    with pytest.raises(PveBackupError, match="outside its user namespace"):
        SafeTreeWriter({"/": tmp_path}, DEFAULT_MAP, log)


HELPER_PARENT = """
import sys
from pathlib import Path
from pvebackup.api.idmap import DEFAULT_UNPRIVILEGED_MAP
from pvebackup.host.lxc.restore import extract_tar
extract_tar(Path(sys.argv[1]), {"/": Path(sys.argv[2])}, list(DEFAULT_UNPRIVILEGED_MAP),
            log=lambda level, msg: None)
"""


def _children(pid: int) -> list[int]:
    out: list[int] = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/children") as f:
            out += [int(x) for x in f.read().split()]
    return out


def _wait_for(check: object, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_helper_dies_with_its_parent(tmp_path: Path) -> None:
    # The archive is a fifo nobody writes to: the helper blocks reading it, in
    # its namespace, when its parent is killed with SIGKILL (no finally runs).
    fifo = tmp_path / "archive.tar"
    os.mkfifo(fifo)
    keep_open = os.open(fifo, os.O_RDWR)
    target = target_dir(tmp_path)
    parent = subprocess.Popen(
        [sys.executable, "-c", HELPER_PARENT, str(fifo), str(target)],
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    try:
        helper: list[int] = []

        def helper_in_namespace() -> bool:
            helper[:] = _children(parent.pid)
            if not helper:
                return False
            try:
                with open(f"/proc/{helper[0]}/status") as f:
                    return any(
                        ln.split()[1:2] == [str(CT_ROOT)]
                        for ln in f if ln.startswith("Uid:")
                    )
            except FileNotFoundError:
                return False

        _wait_for(helper_in_namespace)
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
        _wait_for(lambda: not os.path.exists(f"/proc/{helper[0]}")
                  or _state(helper[0]) == "Z")
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        os.close(keep_open)


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return "gone"


def test_hostile_names_cannot_forge_log_lines(tmp_path: Path, log: LogRecorder) -> None:
    archive = tmp_path / "names.tar"
    name = "dev/x\nERROR: restore finished fine \udcff"
    with tarfile.open(archive, "w", format=tarfile.PAX_FORMAT, encoding="utf-8",
                      errors="surrogateescape") as tf:
        add(tf, name, tarfile.CHRTYPE, dev=(1, 3))
    extract_tar(archive, {"/": target_dir(tmp_path)}, DEFAULT_MAP, log=log)
    (warning,) = log.warnings()
    assert "\n" not in warning and "\\x0aERROR" in warning
    warning.encode("utf-8")  # the byte 0xff is shown escaped, the log file stays UTF-8
    assert "\\udcff" in warning


def test_a_helper_that_cannot_start_is_reported(
    tmp_path: Path, log: LogRecorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(userns, "CHILD_MODULE", "pvebackup.no_such_helper")
    archive = tmp_path / "a.tar"
    with tarfile.open(archive, "w") as tf:
        add(tf, "f", data=b"x")
    with pytest.raises(PveBackupError, match="did not start.*No module named"):
        extract_tar(archive, {"/": target_dir(tmp_path)}, DEFAULT_MAP, log=log)


def test_the_helper_is_a_supervised_child(tmp_path: Path, log: LogRecorder) -> None:
    """The helper starts through kit.proc, so a guest's run state records it (a run
    after a crash can then find and kill it) and its end is reported."""
    from pvebackup.kit.proc import ChildInfo, observe_children

    events: list[tuple[str, int]] = []

    class Recorder:
        def child_started(self, info: ChildInfo) -> None:
            events.append(("started", info.pid))

        def child_ended(self, info: ChildInfo) -> None:
            events.append(("ended", info.pid))

        def dir_planned(self, path: str) -> None:
            pass

    archive = tmp_path / "small.tar"
    with tarfile.open(archive, "w", format=tarfile.PAX_FORMAT) as tf:
        add(tf, "etc/hostname", data=b"ct\n")
    with observe_children(Recorder()):
        extract_tar(archive, {"/": target_dir(tmp_path)}, DEFAULT_MAP, log=log)
    assert [e for e, _ in events] == ["started", "ended"]
    assert events[0][1] == events[1][1]
