"""Restores as qmrestore/pct restore: --unique identities, the MAC warning, --map, --bwlimit."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
from sample_node import MiB, Node, sh

from pvebackup.api.errors import UsageError
from pvebackup.api.types import GuestType
from pvebackup.host.guests import NodeRoot, parse_guest_config
from pvebackup.host.job import run_backup_job
from pvebackup.host.netident import (
    identity_replacements,
    mac_addresses,
    mac_prefix,
    random_ether_addr,
)
from pvebackup.host.restore import run_restore

pytestmark = pytest.mark.e2e

MAC0 = "BC:24:11:00:00:01"
MAC1 = "BC:24:11:00:00:02"
UUID = "6a6a5a2e-1111-2222-3333-444455556666"
GEN = "0e1c4a1a-aaaa-bbbb-cccc-ddddeeeeffff"
NETS = (
    f"net0: virtio={MAC0},bridge=vmbr0,firewall=1\n"
    f"net1: e1000={MAC1.lower()},bridge=vmbr1,tag=5\n"
    "net2: virtio,bridge=vmbr2\n"  # no MAC: QEMU picks one; nothing to renew
    f"smbios1: manufacturer=QUNNRQ==,uuid={UUID},base64=1\n"
    f"vmgenid: {GEN}\n"
)


class _Log:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def write(self, text: str) -> int:
        self.lines.append(text)
        return len(text)

    def flush(self) -> None:
        pass

    @property
    def text(self) -> str:
        return "".join(self.lines)


def _conf(node: Node, vmid: int) -> dict[str, str]:
    text = node.root.config_path(vmid, GuestType.QEMU).read_text()
    return dict(line.split(": ", 1) for line in text.splitlines() if ": " in line)


def test_random_ether_addr_is_pves() -> None:
    assert random_ether_addr("", lambda n: b"\xff" * n) == "FE:FF:FF:FF:FF:FF"
    first = int(random_ether_addr("", lambda n: b"\x01" * n)[:2], 16)
    assert first & 1 == 0 and first & 2 == 2  # unicast, locally administered
    assert random_ether_addr("bc:24:11", lambda n: b"\x01" * n) == "BC:24:11:01:01:01"
    assert random_ether_addr("02", lambda n: b"\xab" * n) == "02:AB:AB:AB:AB:AB"


def test_mac_prefix_from_datacenter_cfg(tmp_path: Path) -> None:
    root = NodeRoot(tmp_path)
    root.pve_dir.mkdir(parents=True)
    warnings: list[str] = []
    assert mac_prefix(root, warnings.append) == "BC:24:11"  # no file: Proxmox's OUI
    (root.pve_dir / "datacenter.cfg").write_text("keyboard: de\nmac_prefix: 0A:11\n")
    assert mac_prefix(root, warnings.append) == "0A:11"
    (root.pve_dir / "datacenter.cfg").write_text("mac_prefix: 01:00\n")  # multicast
    assert mac_prefix(root, warnings.append) == "BC:24:11" and "malformed" in warnings[-1]


def test_identity_rules_of_restore_update_config_line() -> None:
    config = parse_guest_config(
        NETS + "name: x\n", 100, GuestType.QEMU, where="test"
    )
    macs = iter(["BC:24:11:AA:AA:AA", "BC:24:11:BB:BB:BB"])
    plain = identity_replacements(config, unique=False, new_uuid=lambda: "NEW")
    assert plain == {"vmgenid": "NEW"}  # vmgenid: always new, nothing else
    uniq = identity_replacements(
        config, unique=True, new_mac=lambda prefix: next(macs), new_uuid=lambda: "NEW"
    )
    assert uniq["net0"] == "virtio=BC:24:11:AA:AA:AA,bridge=vmbr0,firewall=1"
    assert uniq["net1"] == "e1000=BC:24:11:BB:BB:BB,bridge=vmbr1,tag=5"
    assert "net2" not in uniq
    assert uniq["smbios1"] == "uuid=NEW,manufacturer=QUNNRQ==,base64=1"
    disabled = parse_guest_config("vmgenid: 0\n", 100, GuestType.QEMU, where="t")
    assert identity_replacements(disabled, unique=True) == {}
    ct = parse_guest_config(
        "hostname: c\nrootfs: local:101/subvol-101-disk-0.subvol,size=0T\n"
        f"net0: name=eth0,bridge=vmbr0,hwaddr={MAC0},ip=dhcp\n",
        101, GuestType.LXC, where="t",
    )
    assert mac_addresses(ct) == {MAC0}
    new = identity_replacements(ct, unique=True, new_mac=lambda p: "BC:24:11:CC:CC:CC")
    assert new == {"net0": "name=eth0,bridge=vmbr0,hwaddr=BC:24:11:CC:CC:CC,ip=dhcp"}


def test_unique_restore_renews_macs_and_uuid(node: Node) -> None:
    node.add_vm(100, {"scsi0": MiB}, extra=NETS)
    assert not run_backup_job(node.root, "rec", [100], terminal=None).failed
    log = _Log()
    run_restore(node.root, "rec:qemu-100-000", 200, unique=True, terminal=log)  # type: ignore[arg-type]
    conf = _conf(node, 200)
    for key, old in (("net0", MAC0), ("net1", MAC1)):
        mac = re.search(r"=([0-9A-F:]{17}),", conf[key])
        assert mac and mac.group(1) != old and mac.group(1).startswith("BC:24:11:")
    assert conf["net0"].endswith(",bridge=vmbr0,firewall=1")
    assert conf["net2"] == "virtio,bridge=vmbr2"
    assert UUID not in conf["smbios1"] and "manufacturer=QUNNRQ==" in conf["smbios1"]
    assert conf["vmgenid"] != GEN
    assert "same MAC" not in log.text


def test_restore_without_unique_warns_about_the_source_guest(node: Node) -> None:
    node.add_vm(100, {"scsi0": MiB}, extra=NETS)
    assert not run_backup_job(node.root, "rec", [100], terminal=None).failed
    log = _Log()
    run_restore(node.root, "rec:qemu-100-000", 200, terminal=log)  # type: ignore[arg-type]
    conf = _conf(node, 200)
    assert MAC0 in conf["net0"] and UUID in conf["smbios1"]
    assert conf["vmgenid"] != GEN  # qmrestore renews it even without --unique
    assert re.search(
        rf"WARN: guest 100 uses the same MAC addresses \({MAC0}, {MAC1}\).*--unique", log.text
    )
    # the source is gone, and the guest replaced does not count: no warning
    node.root.config_path(100, GuestType.QEMU).unlink()
    log = _Log()
    run_restore(
        node.root, "rec:qemu-100-000", 200, force=True, terminal=log  # type: ignore[arg-type]
    )
    assert "same MAC" not in log.text


def test_map_puts_each_disk_on_its_storage(node: Node) -> None:
    node.add_vm(100, {"scsi0": MiB, "scsi1": MiB})
    assert not run_backup_job(node.root, "rec", [100], terminal=None).failed
    result = run_restore(
        node.root, "rec:qemu-100-000", 200, storage_map={"scsi1": "other"}, terminal=None
    )
    assert [v.split(":")[0] for v in result.volumes] == ["local", "other"]
    conf = _conf(node, 200)
    assert conf["scsi0"].startswith("local:200/") and conf["scsi1"].startswith("other:200/")
    assert (node.path / "var/lib/other/images/200").is_dir()


def test_map_of_a_disk_the_backup_lacks_is_refused_before_any_volume(node: Node) -> None:
    node.add_vm(100, {"scsi0": MiB})
    assert not run_backup_job(node.root, "rec", [100], terminal=None).failed
    with pytest.raises(UsageError, match="--map virtio3: not a disk of this backup"):
        run_restore(
            node.root, "rec:qemu-100-000", 200, storage_map={"virtio3": "other"}, terminal=None
        )
    assert not node.image(200, "x").parent.exists()
    assert node.root.guest_type(200) is None


def test_restore_bwlimit_paces_qemu_img(node: Node) -> None:
    (disk,) = node.add_vm(100, {"scsi0": 4 * MiB})
    sh("qemu-io", "-f", "qcow2", "-c", "write -P 0x55 0 4M", str(disk))
    assert not run_backup_job(node.root, "rec", [100], terminal=None).failed
    started = time.monotonic()
    run_restore(node.root, "rec:qemu-100-000", 200, terminal=None)
    fast = time.monotonic() - started
    started = time.monotonic()
    run_restore(node.root, "rec:qemu-100-000", 201, bwlimit_kib=1024, terminal=None)
    slow = time.monotonic() - started
    # 4 MiB of data at 1 MiB/s (qemu-img's first slice is free): about 2 s
    assert slow > 1.2 and slow > fast + 0.8, (fast, slow)


def test_restore_progress_uses_the_backup_formula_and_ends_once(node: Node) -> None:
    node.add_vm(100, {"scsi0": 4 * MiB})
    assert not run_backup_job(node.root, "rec", [100], terminal=None).failed
    log = _Log()
    run_restore(node.root, "rec:qemu-100-000", 200, terminal=log)  # type: ignore[arg-type]
    finals = re.findall(r"INFO: drive-scsi0: 100% \(4\.0 of 4\.0 MiB\) in [\d.]+ s, ", log.text)
    assert len(finals) == 1, log.text
    assert log.text.count("restored rec:qemu-100-000") == 0  # the CLI's report says it
