"""``bench.ours.precompile``: our modules are byte-compiled before anything is timed."""

from __future__ import annotations

from pathlib import Path

from bench.ours import precompile


def test_precompile_writes_bytecode_even_without_bytecode_writing(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("X = 1\n")
    (pkg / "sub" / "mod.py").write_text("Y = 2\n")
    assert precompile(pkg)
    assert list((pkg / "__pycache__").glob("__init__.*.pyc"))
    assert list((pkg / "sub" / "__pycache__").glob("mod.*.pyc"))


def test_precompile_reports_a_module_that_does_not_compile(tmp_path: Path) -> None:
    (tmp_path / "bad.py").write_text("def (:\n")
    assert not precompile(tmp_path)
