"""``pvebackup restore``: --unique, --map, --force across guest types, one report line."""

from __future__ import annotations

import pytest
from sample_node import MiB, Node

from pvebackup.api.types import GuestType
from pvebackup.cli.main import main

pytestmark = pytest.mark.e2e

MAC = "BC:24:11:00:00:01"


def run(node: Node, *args: str) -> int:
    return main(["--root", str(node.path), *args])


@pytest.mark.parametrize(
    "bad", ["scsi0", "scsi0=", "=local", "foo0=local", "net0=local"]
)
def test_bad_map_is_a_usage_error(cli_node: Node, bad: str) -> None:
    with pytest.raises(SystemExit) as info:
        run(cli_node, "restore", "rec:qemu-100-000", "200", "--map", bad)
    assert info.value.code == 2


def test_map_given_twice_is_a_usage_error(cli_node: Node) -> None:
    with pytest.raises(SystemExit) as info:
        run(cli_node, "restore", "rec:x", "200", "--map", "scsi0=a", "--map", "scsi0=b")
    assert info.value.code == 2


def test_unique_map_and_one_restored_line(
    cli_node: Node, capsys: pytest.CaptureFixture[str]
) -> None:
    cli_node.add_vm(100, {"scsi0": MiB, "scsi1": MiB}, extra=f"net0: virtio={MAC},bridge=vmbr0\n")
    assert run(cli_node, "backup", "--storage", "rec", "100") == 0
    capsys.readouterr()
    argv = ["restore", "rec:qemu-100-000", "200", "--unique", "--map", "scsi1=other"]
    assert run(cli_node, *argv) == 0
    out, err = capsys.readouterr()
    assert (out + err).count("restored rec:qemu-100-000") == 1
    conf = cli_node.root.config_path(200, GuestType.QEMU).read_text()
    assert MAC not in conf and "net0: virtio=BC:24:11:" in conf
    assert "scsi1: other:200/" in conf

    assert run(cli_node, "restore", "rec:qemu-100-000", "201") == 0
    assert "WARN: guest 100 uses the same MAC address" in capsys.readouterr().err


def test_force_over_a_guest_of_the_other_type_exits_7(
    cli_node: Node, capsys: pytest.CaptureFixture[str]
) -> None:
    cli_node.add_ct(101, mp=False)
    cli_node.add_vm(300, {"scsi0": MiB})
    assert run(cli_node, "backup", "--storage", "rec", "101") == 0
    capsys.readouterr()
    assert run(cli_node, "restore", "rec:lxc-101-000", "300", "--force") == 7
    assert "unable to restore CT 300 - VM 300 already exists" in capsys.readouterr().err
    assert cli_node.root.guest_type(300) == GuestType.QEMU
