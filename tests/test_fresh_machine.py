"""What a fresh machine meets: the Makefile's apt step and the pinned dev tools."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOBODY = 65534


def _make_deps(packages: str, *, as_nobody: bool) -> subprocess.CompletedProcess[str]:
    cmd = ["make", "--no-print-directory", "-C", str(ROOT), "deps", f"DEB_PACKAGES={packages}"]
    if as_nobody and os.geteuid() == 0:
        drop = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
        if subprocess.run([*drop, "test", "-r", str(ROOT / "Makefile")]).returncode:
            pytest.skip(f"user {NOBODY} cannot read {ROOT}")
        cmd = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


needs_tools = pytest.mark.skipif(
    shutil.which("make") is None or shutil.which("setpriv") is None
    or shutil.which("dpkg-query") is None,
    reason="needs make, setpriv and dpkg-query",
)


@needs_tools
def test_non_root_gets_a_clear_message_when_packages_are_missing() -> None:
    out = _make_deps("tar no-such-package-pvebackup", as_nobody=True)
    assert out.returncode != 0
    assert "missing: no-such-package-pvebackup" in out.stderr
    assert "needs root" in out.stderr
    assert "apt-get install no-such-package-pvebackup" in out.stderr
    assert "Permission denied" not in out.stderr  # apt never ran


@needs_tools
def test_nothing_missing_needs_neither_root_nor_apt() -> None:
    out = _make_deps("tar", as_nobody=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "" and out.stderr == ""


def test_every_dev_tool_is_pinned() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    wanted = [re.split(r"[<>=!~\[ ]", req, maxsplit=1)[0].lower()
              for req in project["project"]["optional-dependencies"]["dev"]
              + project["project"]["dependencies"]]
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, sep, version = line.partition("==")
            assert sep and re.fullmatch(r"[0-9][0-9A-Za-z.+!-]*", version), line
            pins[name.lower().replace("_", "-")] = version
    assert [w for w in wanted if w not in pins] == []
    assert "pip" in pins
    makefile = (ROOT / "Makefile").read_text()
    # every pip install of setup goes through the constraints
    setup = makefile.split("$(STAMP):", 1)[1].split("\n\n", 1)[0]
    installs = [ln for ln in setup.splitlines() if "pip install" in ln]
    assert installs and all("-c $(CONSTRAINTS)" in ln for ln in installs)
