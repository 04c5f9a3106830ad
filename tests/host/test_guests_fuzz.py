"""Fuzzing guest configs (VM and container) as a restore reads them from a backup:
success or ``GuestConfigError`` naming the source, never another exception."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fuzzing import FUZZ, typed_or_ok
from pvebackup.api.errors import GuestConfigError
from pvebackup.api.types import GuestType
from pvebackup.host.guests import CtConfig, GuestConfig, VmConfig, parse_guest_config

VM = """\
#my vm
boot: order=scsi0
memory: 2048
scsi0: local:100/vm-100-disk-0.qcow2,size=4G,backup=1
ide2: none,media=cdrom
efidisk0: local:100/vm-100-disk-1.raw,size=4M
unused0: local:100/vm-100-disk-9.raw
[snap1]
memory: 1024
"""

CT = """\
arch: amd64
hostname: ct
rootfs: local:101/subvol-101-disk-0.subvol,size=8G
mp0: local:101/subvol-101-disk-1.subvol,mp=/srv/data,backup=1
mp1: /host/dir,mp=/mnt/bind
unprivileged: 1
lxc.idmap: u 0 100000 65536
lxc.idmap: g 0 100000 65536
"""

_HOSTILE = st.one_of(
    st.text(max_size=40),
    st.sampled_from(
        ["", ",", "=", "none", "local:", ":x", "/dev/sda", "local:100/x,mp=", "a,mp=/../x",
         "local:1/x,mp=/a/./b", "u -1 0 1", "u 0 0 0", "u 0 4294967295 2", "g 0 1",
         "x" * 5000, "1" * 5000, "\x00", "\udcff", "[", "]", "backup=maybe", "mp=/" + "d" * 4000]
    ),
)  # fmt: skip
_KEYS = st.sampled_from(
    ["scsi0", "scsi1", "virtio0", "efidisk0", "rootfs", "mp0", "mp2", "mp" + "9" * 5000,
     "unprivileged", "lxc.idmap", "lxc.mount.entry", "memory", "unused1", "hookscript"]
)  # fmt: skip


@st.composite
def _mutated(draw: st.DrawFn, base: str) -> str:
    lines = base.splitlines()
    how = draw(st.sampled_from(["value", "value", "key-line", "line", "delete", "raw", "bytes"]))
    if how == "raw":
        return draw(st.text(max_size=300))
    if how == "bytes":  # non-UTF-8 as a reader decoding with "replace" would see it
        return draw(st.binary(max_size=300)).decode("utf-8", "replace")
    i = draw(st.integers(0, len(lines) - 1))
    if how == "delete":
        del lines[i]
    elif how == "line":
        lines.insert(i, draw(_HOSTILE))
    elif how == "key-line":
        lines.insert(i, f"{draw(_KEYS)}: {draw(_HOSTILE)}")
    elif ":" in lines[i]:
        lines[i] = f"{lines[i].split(':', 1)[0]}: {draw(_HOSTILE)}"
    return "\n".join(lines) + "\n"


@FUZZ
@given(_mutated(VM))
def test_vm_config_parses_or_gives_a_config_error(text: str) -> None:
    result = typed_or_ok(lambda: parse_guest_config(text, 100, GuestType.QEMU, where="backup:x"))
    assert isinstance(result, VmConfig | GuestConfigError)
    if isinstance(result, GuestConfigError):
        assert str(result).startswith("backup:x")
    else:
        _use(result)


@FUZZ
@given(_mutated(CT))
def test_ct_config_parses_or_gives_a_config_error(text: str) -> None:
    result = typed_or_ok(lambda: parse_guest_config(text, 101, GuestType.LXC, where="backup:y"))
    assert isinstance(result, CtConfig | GuestConfigError)
    if isinstance(result, GuestConfigError):
        assert str(result).startswith("backup:y")
    else:
        _use(result)


def _use(cfg: GuestConfig) -> None:
    """What backup and restore do with a parsed config: none of it may raise."""
    cfg.render()
    cfg.volume_ids()
    if isinstance(cfg, VmConfig):
        # PVE backs up passthrough devices and image paths too (get_backup_volumes)
        assert all(d.spec.volid is not None or d.spec.volume.startswith("/")
                   for d in cfg.disks if d.included)
    elif isinstance(cfg, CtConfig):
        assert all(m.spec.volid is not None for m in cfg.mountpoints if m.included)
        cfg.id_map()
        assert cfg.rootfs.ct_path == "/"


def test_mount_point_with_a_huge_index_is_a_config_error() -> None:
    # int() of more than 4300 digits raises ValueError in Python 3.11: a typed
    # error here, not a traceback of the restore.
    text = CT + "mp" + "9" * 5000 + ": local:101/x.subvol,mp=/x\n"
    with pytest.raises(GuestConfigError, match="mp"):
        parse_guest_config(text, 101, GuestType.LXC, where="backup:z")
