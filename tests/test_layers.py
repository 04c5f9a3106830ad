"""Imports between the layers of pvebackup point downwards only (docs/design.md).

    cli (and top-level modules)  >  host  >  providers  >  store  >  storage  >  kit  >  api
    cli  >  bridge  >  storage  >  kit  >  api       (bridge: beside host)

A module may import its own layer and the layers below. Besides the order:
``api`` imports nothing of ours but itself; nothing imports ``testing`` (the
provider contract suite, at the top) and it never imports ``providers``;
``host`` never imports ``providers``
(it talks to them only through ``api``); ``bridge`` (the Proxmox VE bridge
helper) sits beside ``host``: it imports only ``api``, ``kit`` and ``storage``
and reaches providers through the storage registry; ``store.backends`` never imports the
rest of ``store`` (backends know only keys and bytes).
Checked on the source with ``ast``, so conditional, ``TYPE_CHECKING`` and
function-local imports count too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import pvebackup

SRC = Path(pvebackup.__file__).resolve().parent

LAYERS = ["api", "kit", "storage", "store", "providers", "host", "bridge", "cli"]
BRIDGE_MAY_IMPORT = {"api", "kit", "storage", "bridge"}
TOP = len(LAYERS) - 1  # pvebackup/__init__.py, __main__.py, demo.py, ...: cli level


def layer_of(module: str) -> int:
    """Layer index of a dotted module name inside pvebackup."""
    parts = module.split(".")
    if len(parts) > 1 and parts[1] in LAYERS:
        return LAYERS.index(parts[1])
    return TOP


def module_name(root: Path, path: Path) -> str:
    rel = path.relative_to(root.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(root: Path, path: Path) -> list[tuple[int, str]]:
    """(line, dotted module) of every pvebackup import in a file, relative ones resolved."""
    package = root.name
    current = module_name(root, path)
    is_pkg = path.name == "__init__.py"
    base_parts = current.split(".") if is_pkg else current.split(".")[:-1]
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == package or alias.name.startswith(package + "."):
                    found.append((node.lineno, alias.name))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = base_parts[: len(base_parts) - (node.level - 1)]
                target = ".".join(parts + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target != package and not target.startswith(package + "."):
                continue
            # `from pvebackup import host` imports the subpackage, not the top level
            for alias in node.names:
                sub = root.parent.joinpath(*target.split("."), alias.name)
                if sub.with_suffix(".py").exists() or (sub / "__init__.py").exists():
                    found.append((node.lineno, f"{target}.{alias.name}"))
                else:
                    found.append((node.lineno, target))
    return found


def violation(importer: str, imported: str) -> str | None:
    """Why ``importer`` may not import ``imported``, or None if it may."""
    src, dst = layer_of(importer), layer_of(imported)
    if dst > src:
        return f"{LAYERS[src]} may not import the higher layer {LAYERS[dst]}"
    parts_src, parts_dst = importer.split("."), imported.split(".")
    if LAYERS[src] == "bridge" and LAYERS[dst] not in BRIDGE_MAY_IMPORT:
        return "bridge imports only api, kit and storage (providers via the registry)"
    if LAYERS[src] == "host" and LAYERS[dst] == "providers":
        return "host never imports providers (only pvebackup.api)"
    if parts_dst[1:2] == ["testing"] and parts_src[1:2] != ["testing"]:
        return "nothing imports pvebackup.testing (a test kit, never run in production)"
    if parts_src[1:2] == ["testing"] and parts_dst[1:2] == ["providers"]:
        return "testing reaches a provider only through the storage registry"
    in_backends = parts_src[1:3] == ["store", "backends"]
    if in_backends and parts_dst[1:2] == ["store"] and parts_dst[1:3] != ["store", "backends"]:
        return "store.backends may not import the rest of store"
    return None


def check_tree(root: Path) -> list[str]:
    """Every forbidden import under ``root`` as ``file:line: imports X: why``."""
    problems = []
    for path in sorted(root.rglob("*.py")):
        importer = module_name(root, path)
        for lineno, imported in imported_modules(root, path):
            why = violation(importer, imported)
            if why:
                rel = path.relative_to(root.parent)
                problems.append(f"{rel}:{lineno}: imports {imported}: {why}")
    return problems


def test_pvebackup_imports_point_downwards() -> None:
    assert (SRC / "api").is_dir() and (SRC / "storage").is_dir()
    problems = check_tree(SRC)
    assert not problems, "layer violations:\n" + "\n".join(problems)


def test_api_needs_nothing_else_of_ours() -> None:
    for path in sorted((SRC / "api").rglob("*.py")):
        for _, imported in imported_modules(SRC, path):
            assert imported.startswith("pvebackup.api"), (path, imported)


# The checker itself, on a made-up tree: it must catch each kind of violation.

FAKE_TREE = {
    "__init__.py": "from pvebackup import cli\n",
    "demo.py": "import pvebackup.host.runner\nfrom pvebackup.providers import dir\n",
    "api/__init__.py": "from pvebackup.api import types\n",
    "api/types.py": "",
    "api/bad.py": "import json\nfrom pvebackup.storage import registry\n",
    "api/bad_top.py": "from pvebackup import __version__\n",
    "storage/__init__.py": "",
    "storage/registry.py": "from pvebackup.api import errors\nfrom . import config\n",
    "storage/config.py": "from ..store import chunk\n",
    "store/__init__.py": "",
    "store/chunk.py": "from pvebackup.storage import config\n",
    "store/backends/__init__.py": "",
    "store/backends/s3.py": "from pvebackup.store.backends import base\nfrom ..chunk import x\n",
    "store/backends/base.py": "from pvebackup.api.errors import BackendError\n",
    "providers/__init__.py": "",
    "providers/dir.py": "def f():\n    from pvebackup.host import runner\n",
    "host/__init__.py": "",
    "host/runner.py": (
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
        "    from pvebackup.providers.dir import f\n"
    ),
    "cli/__init__.py": "from pvebackup.host import runner\nfrom pvebackup.providers import dir\n",
}


@pytest.fixture
def fake_tree(tmp_path: Path) -> Path:
    root = tmp_path / "pvebackup"
    for name, text in FAKE_TREE.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_checker_reports_file_line_and_import(fake_tree: Path) -> None:
    problems = check_tree(fake_tree)
    assert problems == [
        "pvebackup/api/bad.py:2: imports pvebackup.storage.registry: "
        "api may not import the higher layer storage",
        "pvebackup/api/bad_top.py:1: imports pvebackup: api may not import the higher layer cli",
        "pvebackup/host/runner.py:3: imports pvebackup.providers.dir: "
        "host never imports providers (only pvebackup.api)",
        "pvebackup/providers/dir.py:2: imports pvebackup.host.runner: "
        "providers may not import the higher layer host",
        "pvebackup/storage/config.py:1: imports pvebackup.store.chunk: "
        "storage may not import the higher layer store",
        "pvebackup/store/backends/s3.py:2: imports pvebackup.store.chunk: "
        "store.backends may not import the rest of store",
    ]


@pytest.mark.parametrize(
    ("importer", "imported", "ok"),
    [
        ("pvebackup.api.provider", "pvebackup.api.errors", True),
        ("pvebackup.storage", "pvebackup.api", True),
        ("pvebackup.storage.config", "pvebackup.kit.safefs", True),
        ("pvebackup.kit.safefs", "pvebackup.storage", False),
        ("pvebackup.kit.safefs", "pvebackup.api.errors", True),
        ("pvebackup.api.errors", "pvebackup.kit", False),
        ("pvebackup.providers.store.disk", "pvebackup.kit.nbdsource", True),
        ("pvebackup.kit.nbdfake", "pvebackup.kit.nbdsource", True),
        ("pvebackup.kit.nbdsource", "pvebackup.providers.store.plan", False),
        ("pvebackup.kit.pacing", "pvebackup.store", False),
        ("pvebackup.storage.config", "pvebackup.storage.registry", True),
        ("pvebackup.store.backends.s3", "pvebackup.api.errors", True),
        ("pvebackup.store.backends.s3", "pvebackup.store", False),
        ("pvebackup.store.datastore", "pvebackup.store.backends.local", True),
        ("pvebackup.host.jobs", "pvebackup.store", True),
        ("pvebackup.host.jobs", "pvebackup.providers", False),
        ("pvebackup.cli.main", "pvebackup.providers.dir", True),
        ("pvebackup.demo", "pvebackup.cli.main", True),
        ("pvebackup.cli.main", "pvebackup.demo", True),
        ("pvebackup.host.jobs", "pvebackup.demo", False),
        ("pvebackup.api", "pvebackup", False),
        ("pvebackup.testing.contract", "pvebackup.host.job", True),
        ("pvebackup.testing.contract", "pvebackup.testing.spy", True),
        ("pvebackup.cli.main", "pvebackup.testing", False),
        ("pvebackup.testing.contract", "pvebackup.providers.directory", False),
        ("pvebackup.bridge.adapter", "pvebackup.storage.registry", True),
        ("pvebackup.bridge.adapter", "pvebackup.kit.fdsource", True),
        ("pvebackup.bridge.adapter", "pvebackup.providers.store", False),
        ("pvebackup.bridge.adapter", "pvebackup.store.datastore", False),
        ("pvebackup.bridge.server", "pvebackup.host.job", False),
        ("pvebackup.bridge.server", "pvebackup", False),
        ("pvebackup.host.job", "pvebackup.bridge.adapter", False),
        ("pvebackup.cli.main", "pvebackup.bridge.server", True),
    ],
)
def test_violation_rule(importer: str, imported: str, ok: bool) -> None:
    assert (violation(importer, imported) is None) is ok


# Modules that may talk libnbd directly. Reading an export is kit.nbdsource's job
# (the one seam tests replace); backup-dir also writes its qcow2 through a private
# qemu-nbd (a target, not a source). A second NBD source would show up here.
LIBNBD_USERS = {"pvebackup.kit.nbdsource", "pvebackup.providers.directory.vm"}


def test_only_the_kit_reads_nbd_exports() -> None:
    users = set()
    for path in SRC.rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom) and not node.level
                else []
            )
            if "nbd" in names:
                users.add(module_name(SRC, path))
    assert users == LIBNBD_USERS
