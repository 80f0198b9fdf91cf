"""The packages' layering: who may import whom, and what the worker side pulls in."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parent.parent


def test_importing_the_interceptor_loads_no_web_server() -> None:
    code = (
        "import json, sys\n"
        "import chio_receipts.interceptor\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    loaded = set(json.loads(out.stdout))
    assert "chio_receipts.interceptor" in loaded
    for banned in ("starlette", "uvicorn", "chio_receipts.sidecar"):
        assert not {m for m in loaded if m == banned or m.startswith(banned + ".")}, banned


def _imports(package: str) -> dict[str, set[str]]:
    """Modules each file of ``package`` imports (absolute names), file by file."""
    out: dict[str, set[str]] = {}
    for path in sorted((REPO / package).rglob("*.py")):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text("utf-8"))):
            if isinstance(node, ast.Import):
                names |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module)
        out[str(path.relative_to(REPO))] = names
    return out


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [("interceptor", "sidecar"), ("sidecar", "interceptor"), ("schemas", "interceptor")],
)
def test_packages_do_not_import_across_the_layers(package: str, forbidden: str) -> None:
    imports = _imports(package)
    assert imports, package
    offenders = {
        path: sorted(n for n in names if n.split(".")[:2] == ["chio_receipts", forbidden])
        for path, names in imports.items()
    }
    assert not {p: n for p, n in offenders.items() if n}, offenders


def test_schemas_imports_no_other_package_of_the_project() -> None:
    for path, names in _imports("schemas").items():
        project = {n for n in names if n.startswith("chio_receipts.")}
        assert all(n.startswith("chio_receipts.schemas") for n in project), (path, project)
