"""A test node's VM start command (``qm start``'s role): ``python liverestore_vm.py ROOT VMID``.

Starts ``qemu-system-x86_64`` (TCG, no guest OS) for the VM's config below ROOT
the way Proxmox VE does: each disk a ``-drive`` with id ``drive-<key>`` and a
device with id ``<key>``, the QMP socket and pid file in ROOT/var/run/qemu-server,
left running in its own session; its output (HMP ``qemu-io``'s too) goes to
``VMID.out`` there. Only scsiN and virtioN disks are handled (enough for the tests).
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from pvebackup.host.guests import NodeRoot, VmConfig
from pvebackup.storage import lookup, parse_volume_id, read_storage_config, storage_config


def main(root_path: str, vmid: int) -> int:
    root = NodeRoot(root_path)
    config = root.load_guest(vmid)
    assert isinstance(config, VmConfig)
    cfg = read_storage_config(root.storage_cfg)
    run = Path(root_path) / "var/run/qemu-server"
    run.mkdir(parents=True, exist_ok=True)
    argv = [
        "qemu-system-x86_64",
        "-machine", "q35,accel=tcg",
        "-nodefaults", "-display", "none", "-m", "64",
        "-qmp", f"unix:{run}/{vmid}.qmp,server=on,wait=off",
        "-pidfile", f"{run}/{vmid}.pid",
        "-device", "virtio-scsi-pci,id=scsihw0",
    ]  # fmt: skip
    for disk in config.disks:
        volid = disk.spec.volid
        if volid is None:
            continue
        storeid, volname = parse_volume_id(volid)
        scfg = storage_config(cfg, storeid)
        path = lookup(scfg["type"]).image_path(scfg, volname)  # type: ignore[attr-defined]
        key = disk.key
        argv += ["-drive", f"file={path},if=none,id=drive-{key},format=qcow2"]
        if key.startswith("scsi"):
            argv += ["-device", f"scsi-hd,bus=scsihw0.0,drive=drive-{key},id={key}"]
        else:
            argv += ["-device", f"virtio-blk-pci,drive=drive-{key},id={key}"]
    # Not -daemonize: that sends QEMU's stdout, where HMP qemu-io prints, to
    # /dev/null. A new session instead, output in a log the test reads.
    with open(run / f"{vmid}.out", "ab") as out:
        vm = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True
        )
    deadline = time.monotonic() + 30
    while not (run / f"{vmid}.pid").exists() or not (run / f"{vmid}.qmp").exists():
        if vm.poll() is not None or time.monotonic() > deadline:
            return 1
        time.sleep(0.02)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], int(sys.argv[2])))
