"""ROOT/etc/vzdump.conf: the live-backup defaults, and what a malformed file does."""

from __future__ import annotations

from pathlib import Path

import pytest

from pvebackup.api.errors import ConfigError
from pvebackup.host.defaults import JobDefaults, read_job_defaults
from pvebackup.host.guests import NodeRoot


def _conf(tmp_path: Path, text: str | bytes) -> NodeRoot:
    (tmp_path / "etc").mkdir(exist_ok=True)
    path = tmp_path / "etc/vzdump.conf"
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return NodeRoot(tmp_path)


def test_no_file_no_defaults(tmp_path: Path) -> None:
    assert read_job_defaults(NodeRoot(tmp_path)) == JobDefaults()


def test_vzdump_keys(tmp_path: Path) -> None:
    root = _conf(
        tmp_path,
        "# vzdump defaults\ntmpdir: /var/tmp\nmode: suspend\nstopwait: 3\n"
        "fleecing: enabled=1,storage=local\n",
    )
    assert read_job_defaults(root) == JobDefaults("suspend", 3.0, "local")
    root = _conf(tmp_path, "fleecing: enabled=0,storage=local\n")
    assert read_job_defaults(root).fleecing_storage is None


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("mode: yolo\n", ":1: mode 'yolo'"),
        ("\n\nstopwait: -5\n", ":3: stopwait"),
        ("stopwait: nan\n", ":1: stopwait"),
        ("no colon here\n", ":1: cannot parse"),
        ("fleecing: enabled=1\n", "names no storage"),
        (b"mode: \xff\n", "cannot read"),
        ("# big\n" + "x: y\n" * 300_000, "cannot read"),
    ],
)
def test_malformed_files_fail_naming_file_and_line(
    tmp_path: Path, text: str | bytes, where: str
) -> None:
    with pytest.raises(ConfigError) as err:
        read_job_defaults(_conf(tmp_path, text))
    assert "vzdump.conf" in str(err.value) and where in str(err.value)

