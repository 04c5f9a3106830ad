"""Fixtures for the storage layer tests: a clean registry, a fake installed plugin."""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pvebackup.storage import registry


@pytest.fixture(autouse=True)
def fresh_entry_points() -> Iterator[None]:
    """Every test sees entry points as they are now, and leaves no loaded plugin behind."""
    registry.refresh()
    yield
    registry.refresh()


InstallPlugin = Callable[[str, str, str], Path]  # see test_plugin_registry.py


@pytest.fixture
def install_plugin(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[InstallPlugin]:
    """Install a real distribution (dist-info + module) on sys.path.

    ``install_plugin(module_name, source, entry_points_section_body)`` writes
    ``module_name.py`` and a ``.dist-info`` whose entry_points.txt has the
    ``[pvebackup.storage_plugins]`` section given, then rescans entry points.
    """
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    modules: list[str] = []
    count = 0

    def install(module_name: str, source: str, entry_points: str) -> Path:
        nonlocal count
        count += 1
        (site / f"{module_name}.py").write_text(textwrap.dedent(source))
        dist = site / f"fakeplugin{count}-1.0.dist-info"
        dist.mkdir()
        (dist / "METADATA").write_text(
            f"Metadata-Version: 2.1\nName: fakeplugin{count}\nVersion: 1.0\n"
        )
        (dist / "entry_points.txt").write_text(
            f"[{registry.ENTRY_POINT_GROUP}]\n{textwrap.dedent(entry_points)}\n"
        )
        modules.append(module_name)
        registry.refresh()
        return dist

    yield install
    for name in modules:
        sys.modules.pop(name, None)
