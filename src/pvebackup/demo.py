"""`make demo`: the main job on a sample node, start to finish, in a fresh directory.

A VM (one qcow2 disk with compressible and incompressible data) and an
unprivileged container (a rootfs of a few hundred files owned by mapped ids, plus a
mount point) are backed up, changed, backed up again (incrementally for the VM,
through its dirty bitmap; the container to backup-store reusing its unchanged
files unread), restored to new VMIDs and compared with the originals as they were
at the second backup; one file of the container is listed and extracted from
backup-store (``pvebackup ls``/``extract``). Then a *running* VM (``qemu-system-x86_64``, TCG,
no guest OS, started as Proxmox VE starts one) is backed up live while the demo
writes to its disk through the device, restored and compared with its state at
backup start. Every step runs the real `pvebackup` command line, as an operator
would. Exit status 0 only when every restore is identical.

Run: ``python -m pvebackup.demo [--dir DIR] [--keep]``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from pvebackup.host.lxc.compare import compare_trees
from pvebackup.kit import qemuimg
from pvebackup.kit.units import format_bytes

MiB = 1024 * 1024
VM_ID, CT_ID, LIVE_ID = 100, 101, 102
VM_RESTORED, CT_RESTORED, LIVE_RESTORED = 200, 201, 202
LIVE_SIZE = 64 * MiB
DISK_SIZE = 512 * MiB
DATA_REGIONS = 24  # 4 MiB each: alternating random and text-like data
HOST_ID_BASE = 100000  # Proxmox VE's default map for unprivileged containers

STORAGE_CFG = """\
dir: local
\tpath {root}/var/lib/vz
\tcontent images,rootdir

backup-store: store
\tpath {root}/backup/store

backup-dir: plain
\tpath {root}/backup/plain
"""


@dataclass
class Step:
    what: str
    guest: str
    storage: str
    kind: str
    size: int | str  # a str: as the job's table printed it
    seconds: float
    result: str


def say(message: str) -> None:
    print(f"\n==> {message}", flush=True)


class Demo:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.images = root / "var/lib/vz/images"
        self.steps: list[Step] = []
        self.last_stdout = ""
        self.rng = random.Random(20241126)

    # running the CLI ---------------------------------------------------------------

    def pvebackup(self, *args: str, capture: bool = False) -> tuple[float, str]:
        """Run the CLI; returns (seconds, output). The task log (stderr) is shown
        as it comes and also returned, so the summary can say what really happened."""
        cmd = [sys.executable, "-m", "pvebackup", "--root", str(self.root), *args]
        print("$ pvebackup " + " ".join(["--root", str(self.root), *args]), flush=True)
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, text=True, stderr=subprocess.PIPE, stdout=subprocess.PIPE)
        assert proc.stderr is not None and proc.stdout is not None
        log = []
        for line in proc.stderr:
            print(line, end="", file=sys.stderr, flush=True)
            log.append(line)
        stdout = proc.stdout.read()  # the command's report comes after its log
        proc.wait()
        self.last_stdout = stdout
        if not capture:
            print(stdout, end="", flush=True)
        elapsed = time.perf_counter() - start
        if proc.returncode != 0:
            raise SystemExit(f"demo: `pvebackup {' '.join(args)}` failed (exit {proc.returncode})")
        return elapsed, stdout if capture else "".join(log)

    def newest_volume(self, storeid: str, vmid: int) -> dict[str, object]:
        _, out = self.pvebackup("list", storeid, "--output", "json", capture=True)
        print(out, end="", flush=True)  # what the command just shown printed
        records = [r for r in json.loads(out) if int(r["vmid"]) == vmid]
        if not records:
            raise SystemExit(f"demo: no backup of {vmid} on {storeid}")
        return max(records, key=lambda r: int(str(r["ctime"])))

    # the sample node ---------------------------------------------------------------

    def build_node(self) -> None:
        say(f"building a sample node in {self.root}")
        pve = self.root / "etc/pve"
        for sub in ("qemu-server", "lxc", "firewall"):
            (pve / sub).mkdir(parents=True, exist_ok=True)
        (pve / "storage.cfg").write_text(STORAGE_CFG.format(root=self.root))
        # backup-dir and backup-store refuse a missing path (an unmounted disk must
        # not fill up /)
        (self.root / "backup/plain").mkdir(parents=True, exist_ok=True)
        (self.root / "backup/store").mkdir(parents=True, exist_ok=True)
        self.build_vm(pve)
        self.build_container(pve)

    def build_vm(self, pve: Path) -> None:
        vmdir = self.images / str(VM_ID)
        vmdir.mkdir(parents=True, exist_ok=True)
        raw = vmdir / "seed.raw"
        words = b"backup provider qemu nbd bitmap fleecing chunk store restore verify "
        with raw.open("wb") as f:
            f.truncate(DISK_SIZE)
            for i in range(DATA_REGIONS):
                f.seek(i * 2 * 4 * MiB)  # data regions with holes between them
                if i % 2:
                    f.write(self.rng.randbytes(4 * MiB))
                else:
                    f.write((words * (4 * MiB // len(words) + 1))[: 4 * MiB])
        disk = vmdir / f"vm-{VM_ID}-disk-0.qcow2"
        qemuimg.convert(str(raw), disk, source_fmt="raw", target_fmt="qcow2")
        raw.unlink()
        (pve / f"qemu-server/{VM_ID}.conf").write_text(
            "# demo VM: one qcow2 disk with mixed data\n"
            f"name: demo-vm\nmemory: 1024\ncores: 2\nostype: l26\nboot: order=scsi0\n"
            f"scsi0: local:{VM_ID}/{disk.name},size={DISK_SIZE // MiB}M\n"
            "ide2: none,media=cdrom\nnet0: virtio=BC:24:11:00:00:01,bridge=vmbr0\n"
        )
        (pve / f"firewall/{VM_ID}.fw").write_text(
            "[OPTIONS]\nenable: 1\n\n[RULES]\nIN ACCEPT -p tcp -dport 22\n"
        )
        print(f"VM {VM_ID}: {disk} ({format_bytes(DISK_SIZE)} virtual, "
              f"{DATA_REGIONS} x 4 MiB of data, half random, half text)")

    def build_container(self, pve: Path) -> None:
        ctdir = self.images / str(CT_ID)
        rootfs = ctdir / f"subvol-{CT_ID}-disk-0.subvol"
        data = ctdir / f"subvol-{CT_ID}-disk-1.subvol"
        for d in (rootfs, data):
            d.mkdir(parents=True, exist_ok=True)
            os.chown(d, HOST_ID_BASE, HOST_ID_BASE)
        for top in ("etc", "usr/bin", "var/log", "home/alice", "srv/data"):
            (rootfs / top).mkdir(parents=True, exist_ok=True)
        for d in [rootfs, *(p for p in rootfs.rglob("*") if p.is_dir())]:
            os.chown(d, HOST_ID_BASE, HOST_ID_BASE)  # the container's root owns them
        count = 0
        for i in range(300):
            sub = ("etc", "usr/bin", "var/log", "home/alice")[i % 4]
            path = rootfs / sub / f"file-{i:03d}"
            path.write_bytes(self.rng.randbytes(self.rng.randrange(0, 16384)))
            owner = HOST_ID_BASE + (1000 if sub == "home/alice" else 0)
            os.chown(path, owner, owner)
            os.chmod(path, 0o755 if sub == "usr/bin" else 0o644)
            count += 1
        os.symlink("../usr/bin/file-001", rootfs / "etc/link-to-bin")
        os.lchown(rootfs / "etc/link-to-bin", HOST_ID_BASE, HOST_ID_BASE)
        os.link(rootfs / "etc/file-000", rootfs / "etc/hardlink-000")
        os.chown(rootfs / "home/alice", HOST_ID_BASE + 1000, HOST_ID_BASE + 1000)
        for i in range(60):
            record = data / f"record-{i:02d}.txt"
            record.write_text(f"record {i}\n" * (i + 1))
            os.chown(record, HOST_ID_BASE + 33, HOST_ID_BASE + 33)
            count += 1
        # /srv/data in the rootfs is hidden by the mount point; what the container
        # (and so its backup) sees there is the mount point's root directory
        mp_root = data.stat()
        os.utime(rootfs / "srv/data", ns=(mp_root.st_atime_ns, mp_root.st_mtime_ns))
        (pve / f"lxc/{CT_ID}.conf").write_text(
            "arch: amd64\nhostname: demo-ct\nmemory: 512\nostype: debian\nunprivileged: 1\n"
            f"rootfs: local:{CT_ID}/{rootfs.name},size=0T\n"
            f"mp0: local:{CT_ID}/{data.name},mp=/srv/data,backup=1,size=0T\n"
        )
        print(f"CT {CT_ID}: {count} files owned by mapped ids (100000+), "
              f"mount point /srv/data")

    def change_guests(self) -> None:
        say("changing the guests: scattered writes to the VM disk, edited container files")
        disk = self.images / f"{VM_ID}/vm-{VM_ID}-disk-0.qcow2"
        cmds: list[str] = []
        for i in range(32):
            offset = self.rng.randrange(0, DISK_SIZE // (64 * 1024)) * 64 * 1024
            cmds += ["-c", f"write -P {i + 1} {offset} 64k"]
        run(["qemu-io", "-f", "qcow2", *cmds, str(disk)])
        print(f"VM {VM_ID}: 32 writes of 64 KiB at random offsets "
              f"(2 MiB of {format_bytes(DISK_SIZE)})")
        rootfs = self.images / f"{CT_ID}/subvol-{CT_ID}-disk-0.subvol"
        (rootfs / "etc/file-004").write_text("changed after the first backup\n")
        (rootfs / "var/log/file-002").unlink()
        new = rootfs / "home/alice/new-note.txt"
        new.write_text("a file created between the backups\n")
        os.chown(new, HOST_ID_BASE + 1000, HOST_ID_BASE + 1000)
        print(f"CT {CT_ID}: one file changed, one removed, one added")

    # the job -----------------------------------------------------------------------

    def backup(self, label: str) -> None:
        say(f"{label}: backing up VM {VM_ID} to 'store' and CT {CT_ID} to 'plain' and 'store'")
        for vmid, storeid, guest in ((VM_ID, "store", "VM"), (CT_ID, "plain", "CT"),
                                     (CT_ID, "store", "CT")):  # fmt: skip
            seconds, log = self.pvebackup("backup", "--storage", storeid, str(vmid))
            size = table_size(self.last_stdout, vmid)
            rec = self.newest_volume(storeid, vmid)
            # what the host decided, from the task log: bitmap reuse = incremental;
            # for a container in backup-store, the unchanged entries it did not read
            kind = "incremental" if "bitmap mode reuse" in log else "full"
            reused = re.search(r"reused (\d+) unchanged entries", log)
            if reused:
                kind = f"{reused.group(1)} entries reused"
            self.steps.append(Step(label, f"{guest} {vmid}", storeid, kind,
                                   size, seconds, str(rec["volid"])))

    def restore_and_compare(self) -> bool:
        say(f"restoring to new VMIDs {VM_RESTORED} and {CT_RESTORED} and comparing")
        ok = True
        vm_vol = str(self.newest_volume("store", VM_ID)["volid"])
        # --unique: the restored VM gets new MAC addresses (its source still runs here)
        seconds, _ = self.pvebackup(
            "restore", vm_vol, str(VM_RESTORED), "--storage", "local", "--unique")
        original = self.images / f"{VM_ID}/vm-{VM_ID}-disk-0.qcow2"
        restored = sorted((self.images / str(VM_RESTORED)).glob("*.qcow2"))
        same = len(restored) == 1 and qemuimg.compare(
            original, restored[0], fmt_a="qcow2", fmt_b="qcow2")
        ok &= same
        self.steps.append(Step("restore", f"VM {VM_ID} -> {VM_RESTORED}", "store", "qemu-img",
                               DISK_SIZE, seconds, "identical" if same else "DIFFERENT"))

        ct_vol = str(self.newest_volume("plain", CT_ID)["volid"])
        seconds, _ = self.pvebackup("restore", ct_vol, str(CT_RESTORED), "--storage", "local")
        diffs: list[str] = []
        for disk in ("disk-0", "disk-1"):
            src = self.images / f"{CT_ID}/subvol-{CT_ID}-{disk}.subvol"
            dst = self.images / f"{CT_RESTORED}/subvol-{CT_RESTORED}-{disk}.subvol"
            diffs += compare_trees(src, dst) if dst.is_dir() else [f"{dst}: missing"]
        for line in diffs[:20]:
            print(f"  difference: {line}")
        ok &= not diffs
        self.steps.append(Step("restore", f"CT {CT_ID} -> {CT_RESTORED}", "plain", "tar",
                               sum(f.stat().st_size for f in (self.images / str(CT_ID)).rglob("*")
                                   if f.is_file()),
                               seconds, "identical" if not diffs else f"{len(diffs)} differences"))
        return ok

    def single_files(self) -> bool:
        """List a directory of the container's backup-store backup, extract one file."""
        say(f"single files of CT {CT_ID}'s backup in 'store' (through its catalog)")
        vol = str(self.newest_volume("store", CT_ID)["volid"])
        self.pvebackup("ls", vol, "/home/alice")
        target = self.root / "extracted"
        seconds, _ = self.pvebackup("extract", vol, "/etc/file-004", "--target", str(target))
        source = self.images / f"{CT_ID}/subvol-{CT_ID}-disk-0.subvol/etc/file-004"
        got = target / "file-004"
        same = got.is_file() and got.read_bytes() == source.read_bytes()
        self.steps.append(Step("extract", f"CT {CT_ID} /etc/file-004", "store", "file",
                               source.stat().st_size, seconds,
                               "identical" if same else "DIFFERENT"))  # fmt: skip
        return same

    # the running VM -----------------------------------------------------------------

    def live_backup(self) -> bool:
        """Back up a running VM while writing to it; the restore must show backup start."""
        say(f"live backup: VM {LIVE_ID} runs (qemu-system-x86_64, TCG, no OS) and is"
            " written to during its backup")
        vmdir = self.images / str(LIVE_ID)
        vmdir.mkdir(parents=True, exist_ok=True)
        disk = vmdir / f"vm-{LIVE_ID}-disk-0.qcow2"
        run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), str(LIVE_SIZE)])
        run(["qemu-io", "-f", "qcow2", "-c", f"write -P 0x5a 0 {LIVE_SIZE}", str(disk)])
        at_start = vmdir / "state-at-backup-start.qcow2"
        shutil.copyfile(disk, at_start)  # nothing writes before the backup's exports exist
        (self.root / f"etc/pve/qemu-server/{LIVE_ID}.conf").write_text(
            "# demo VM that runs during its backup\nname: demo-live\nmemory: 32\n"
            f"scsi0: local:{LIVE_ID}/{disk.name},size={LIVE_SIZE // MiB}M\n"
        )
        run_dir = self.root / "var/run/qemu-server"
        run_dir.mkdir(parents=True, exist_ok=True)
        demo_qmp = run_dir / f"{LIVE_ID}.demo.qmp"  # the demo's own monitor: the "guest"
        qemu = subprocess.Popen([
            "qemu-system-x86_64", "-machine", "q35,accel=tcg", "-nodefaults", "-display", "none",
            "-m", "32", "-pidfile", str(run_dir / f"{LIVE_ID}.pid"),
            "-qmp", f"unix:{run_dir / f'{LIVE_ID}.qmp'},server=on,wait=off",
            "-qmp", f"unix:{demo_qmp},server=on,wait=off",
            "-drive", f"file={disk},if=none,id=drive-scsi0,format=qcow2",
            "-device", "virtio-scsi-pci,id=scsihw0",
            "-device", "scsi-hd,bus=scsihw0.0,drive=drive-scsi0,id=scsi0",
        ], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            return self._live_backup_of(qemu, demo_qmp, disk, at_start)
        finally:
            qemu.kill()  # stopped by PID; the disk image is closed with it
            qemu.wait()

    def _live_backup_of(
        self, qemu: subprocess.Popen[bytes], demo_qmp: Path, disk: Path, at_start: Path
    ) -> bool:
        from pvebackup.host.qemu.qmp import QmpClient

        deadline = time.monotonic() + 30
        while not demo_qmp.exists():
            if qemu.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("demo: qemu-system-x86_64 did not start")
            time.sleep(0.05)
        guest = QmpClient(str(demo_qmp))
        started = time.perf_counter()
        backup = subprocess.Popen(
            [sys.executable, "-m", "pvebackup", "--root", str(self.root), "backup",
             "--storage", "store", "--bwlimit", "16384", str(LIVE_ID)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        while not guest.execute("query-block-exports"):  # the backup's instant has passed
            if backup.poll() is not None or time.monotonic() > deadline:
                break
            time.sleep(0.01)
        writes = 0
        for offset in range(0, LIVE_SIZE, 4 * MiB):
            guest.execute("human-monitor-command", **{
                "command-line": f'qemu-io drive-scsi0 "write -P 0xa5 {offset} 1M"'})
            writes += 1
        out, _ = backup.communicate()
        seconds = time.perf_counter() - started
        print(out, end="", flush=True)
        status = guest.execute("query-status")["status"]
        guest.close()
        if backup.returncode != 0:
            raise SystemExit(f"demo: live backup failed (exit {backup.returncode})")
        print(f"VM {LIVE_ID}: {writes} writes of 1 MiB during the backup; VM still {status}")
        kind = "snapshot mode" if "backup mode snapshot" in out else "?"
        self.steps.append(Step("live backup", f"VM {LIVE_ID}", "store", kind,
                               table_size(out, LIVE_ID), seconds,
                               str(self.newest_volume("store", LIVE_ID)["volid"])))
        vol = str(self.newest_volume("store", LIVE_ID)["volid"])
        seconds, _ = self.pvebackup("restore", vol, str(LIVE_RESTORED), "--storage", "local")
        restored = sorted((self.images / str(LIVE_RESTORED)).glob("*.qcow2"))
        same = len(restored) == 1 and subprocess.run(
            ["qemu-img", "compare", "-q", str(at_start), str(restored[0])]).returncode == 0
        changed = subprocess.run(
            ["qemu-img", "compare", "-q", "-U", str(at_start), str(disk)]).returncode == 1
        ok = same and changed and status == "running"
        self.steps.append(Step("restore", f"VM {LIVE_ID} -> {LIVE_RESTORED}", "store",
                               "at backup start", LIVE_SIZE, seconds,
                               "identical" if ok else "DIFFERENT"))
        return ok

    def summary(self) -> None:
        say("summary")
        header = ("step", "guest", "storage", "kind", "size", "time", "result")
        rows = [header] + [
            (s.what, s.guest, s.storage, s.kind,
             s.size if isinstance(s.size, str) else format_bytes(s.size), f"{s.seconds:.1f} s",
             s.result)
            for s in self.steps
        ]
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        for n, row in enumerate(rows):
            print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)))
            if n == 0:
                print("  ".join("-" * w for w in widths))
        print("\nsize: for backups, the SIZE of the job's table (what the backup added to"
              " its storage); for restores, the guest's data size.")


def table_size(stdout: str, vmid: int) -> str:
    """The SIZE cell of ``vmid``'s row in a backup job's table (VMID TYPE STATUS TIME
    SIZE TARGET; the size is two words, ``48.0 MiB``)."""
    for line in stdout.splitlines():
        cells = line.split()
        if cells and cells[0] == str(vmid) and len(cells) >= 7:
            return " ".join(cells[4:6])
    raise SystemExit(f"demo: no row for {vmid} in the job's table")


def run(cmd: list[str]) -> None:
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pvebackup.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, help="work in DIR (default: a new temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the directory afterwards")
    args = parser.parse_args(argv)
    root = args.dir or Path(tempfile.mkdtemp(prefix="pvebackup-demo-"))
    root = root.resolve()
    root.mkdir(parents=True, exist_ok=True)
    print(f"pvebackup demo: everything happens below {root}")
    demo = Demo(root)
    try:
        demo.build_node()
        demo.backup("first backup")
        demo.change_guests()
        demo.backup("second backup")
        ok = demo.restore_and_compare()
        ok &= demo.single_files()
        ok &= demo.live_backup()
        demo.summary()
    finally:
        if not args.keep and args.dir is None:
            shutil.rmtree(root, ignore_errors=True)
            print(f"\n(removed {root}; `make demo DEMO_ARGS=--keep` keeps it to look around)")
    print("\nresult: " + ("every guest restored identical to its backup" if ok
                          else "DIFFERENCES FOUND (see above)"))
    if args.keep or args.dir is not None:
        print(f"the node is kept in {root} (try: pvebackup --root {root} list store)")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
