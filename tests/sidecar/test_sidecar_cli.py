"""``chio-receipts sidecar serve`` as a real process on a free 127.0.0.1 port."""

from __future__ import annotations

import socket
import subprocess
import sys

import httpx
import pytest

from tests.support.helpers import eventually

pytestmark = pytest.mark.integration


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_sidecar_serve_command_serves_the_api(tmp_path: object) -> None:
    port = _free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from chio_receipts.cli_sidecar import app; app()",
            "serve",
            "--port",
            str(port),
            "--log-level",
            "warning",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=2) as http:

            async def healthy() -> bool:
                try:
                    return (await http.get("/healthz")).status_code == 200
                except httpx.HTTPError:
                    assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
                    return False

            await eventually(healthy, timeout=30)
            created = await http.post(
                "/v1/capabilities", json={"subject": "agent:a", "scope": ["t"], "ttl_seconds": 9}
            )
            assert created.status_code == 201
            keys = (await http.get("/v1/keys")).json()
            assert keys["current"] == "sidecar-1"
            bad = await http.post("/v1/evaluate", content=b"{")
            assert bad.status_code == 400
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        if proc.stderr:
            proc.stderr.close()
