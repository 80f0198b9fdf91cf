"""The consumers' import boundaries: the SIEM exporter and the receipt builder share only the
package's root pieces (runner, dead letters, wire decoding, keys, errors, metrics)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2] / "consumers"
PKG = "chio_receipts.consumers"
BUILDER = {f"{PKG}.{m}" for m in ("_consumer", "_builder", "_clickhouse", "_envelope", "_rows")}
BUILDER.add(f"{PKG}._verify")


def _imports(path: Path) -> set[str]:
    """Modules ``path`` imports (``from a import b`` counts as ``a`` and ``a.b``)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text("utf-8"))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out.update(f"{node.module}.{alias.name}" for alias in node.names)
    return out


def test_siem_imports_no_builder_module_and_not_the_package_root() -> None:
    files = sorted((ROOT / "siem").glob("*.py"))
    assert len(files) >= 8
    for path in files:
        imported = _imports(path)
        assert not imported & BUILDER, f"{path.name} imports {sorted(imported & BUILDER)}"
        # The package root re-exports the builder: importing it would pull the builder in.
        assert PKG not in imported, f"{path.name} imports {PKG}"


def test_builder_modules_do_not_import_siem() -> None:
    for name in sorted(BUILDER):
        path = ROOT / (name.rsplit(".", 1)[1] + ".py")
        imported = _imports(path)
        assert not {m for m in imported if m.startswith(f"{PKG}.siem")}, path.name
        assert PKG not in imported, f"{path.name} imports {PKG}"


def test_shared_modules_import_neither_side() -> None:
    shared = ("_runner", "_dlq", "_wire", "_keys", "_errors", "_metrics", "_failpoints")
    for name in shared:
        imported = _imports(ROOT / f"{name}.py")
        assert not imported & BUILDER, name
        assert not {m for m in imported if m.startswith(f"{PKG}.siem")}, name
