"""What the worker side pulls in at import time.

Who may import whom is checked statically by the import-linter contracts in pyproject.toml
(``make lint``); this test checks the effect a worker sees: no web server is loaded.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.unit


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
