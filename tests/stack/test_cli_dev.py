"""`chio-receipts dev up|status|down` manage a stack that outlives the command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from chio_receipts.stack import port_open
from chio_receipts.stack._process import pid_alive

CLI = [sys.executable, "-m", "chio_receipts"]
REPO = Path(__file__).resolve().parents[2]


@pytest.mark.integration
def test_dev_up_status_down(tmp_path: Path) -> None:
    env = dict(
        os.environ,
        CHIO_DATA_DIR=str(tmp_path / "data"),
        CHIO_CACHE_DIR=os.environ.get("CHIO_CACHE_DIR", str(REPO / ".cache")),
    )

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*CLI, "dev", *args], env=env, capture_output=True, text=True, timeout=180
        )

    up = cli(
        "up", "--temporal-port", "0", "--kafka-port", "0", "--with-registry", "--registry-port", "0"
    )
    assert up.returncode == 0, up.stdout + up.stderr
    state = json.loads((tmp_path / "data" / "stack.json").read_text())
    try:
        assert port_open(state["kafka_bootstrap"])
        assert port_open(state["temporal_address"])
        registry = state["registry_url"]
        assert registry.endswith("/apis/ccompat/v7"), registry
        assert httpx.get(f"{registry}/subjects", timeout=5).json() == []
        status = cli("status")
        assert status.returncode == 0
        assert state["kafka_bootstrap"] in status.stdout
        assert "registry" in status.stdout
    finally:
        down = cli("down")
    assert down.returncode == 0
    assert "kafka" in down.stdout
    assert "temporal" in down.stdout
    assert "registry" in down.stdout
    assert not pid_alive(state["registry_pid"])
    assert not pid_alive(state["kafka_pid"])
    assert not pid_alive(state["temporal_pid"])
    assert not (tmp_path / "data" / "stack.json").exists()
