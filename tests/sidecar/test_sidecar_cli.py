"""``chio-receipts sidecar serve`` as a real process on a free 127.0.0.1 port, on a data
directory: what survives ``kill -9``, and ``sidecar keys rotate`` / ``keys list``."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from chio_receipts.sidecar import key_id_for
from tests.support.helpers import eventually

pytestmark = pytest.mark.integration


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", "from chio_receipts.cli_sidecar import app; app()", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


class _Served:
    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.port = _free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "from chio_receipts.cli_sidecar import app; app()",
                "serve",
                "--port",
                str(self.port),
                "--data-dir",
                str(self.data_dir),
                "--log-level",
                "warning",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )

    async def ready(self, http: httpx.AsyncClient) -> None:
        async def healthy() -> bool:
            try:
                return (await http.get("/healthz")).status_code == 200
            except httpx.HTTPError:
                assert self.proc is not None
                assert self.proc.poll() is None, self.proc.stderr.read() if self.proc.stderr else ""
                return False

        await eventually(healthy, timeout=30)

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> None:
        if self.proc is not None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=10)
            if self.proc.stderr:
                self.proc.stderr.close()
            self.proc = None


@pytest.fixture
def served(tmp_path: Path) -> Iterator[_Served]:
    s = _Served(tmp_path / "sidecar")
    yield s
    s.stop()


async def test_sidecar_serve_command_serves_the_api(served: _Served) -> None:
    served.start()
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{served.port}", timeout=2) as http:
        await served.ready(http)
        created = await http.post(
            "/v1/capabilities", json={"subject": "agent:a", "scope": ["t"], "ttl_seconds": 9}
        )
        assert created.status_code == 201
        keys = (await http.get("/v1/keys")).json()
        (only,) = keys["keys"]
        assert keys["current"] == only["key_id"] == key_id_for(bytes.fromhex(only["public_key"]))
        bad = await http.post("/v1/evaluate", content=b"{")
        assert bad.status_code == 400


async def test_kill_9_keeps_capabilities_revocations_and_the_key(served: _Served) -> None:
    served.start()
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{served.port}", timeout=2) as http:
        await served.ready(http)
        body = {"subject": "agent:a", "scope": ["t"], "ttl_seconds": 600}
        cap = (await http.post("/v1/capabilities", json=body)).json()
        gone = (await http.post("/v1/capabilities", json=body)).json()
        assert (await http.post(f"/v1/capabilities/{gone['id']}/revoke")).status_code == 200
        key_before = (await http.get("/v1/keys")).json()
        served.stop(signal.SIGKILL)
        served.start()
        await served.ready(http)
        assert (await http.get("/v1/keys")).json() == key_before
        assert (await http.get(f"/v1/capabilities/{cap['id']}")).json() == cap
        evaluate = {"capability_id": cap["id"], "tool_server": "s", "tool": "t"}
        allowed = (await http.post("/v1/evaluate", json=evaluate)).json()["receipt"]
        assert allowed["verdict"] == "ALLOW"
        assert allowed["key_id"] == key_before["current"]
        evaluate["capability_id"] = gone["id"]
        denied = (await http.post("/v1/evaluate", json=evaluate)).json()["receipt"]
        assert denied["verdict"] == "DENY"
        assert "revoked" in denied["reason"]
    served.stop()
    checked = _cli("verify-log", "--data-dir", str(served.data_dir))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "OK: 2 receipt(s)" in checked.stdout


async def test_keys_rotate_reaches_the_running_sidecar_by_sighup(served: _Served) -> None:
    served.start()
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{served.port}", timeout=2) as http:
        await served.ready(http)
        old = (await http.get("/v1/keys")).json()["current"]
        rotated = _cli("keys", "rotate", "--data-dir", str(served.data_dir))
        assert rotated.returncode == 0, rotated.stderr
        assert "SIGHUP" in rotated.stdout

        async def rotated_in_server() -> dict[str, object] | None:
            keys = (await http.get("/v1/keys")).json()
            return keys if keys["current"] != old else None

        keys = await eventually(rotated_in_server, timeout=10)
        assert {k["key_id"] for k in keys["keys"]} == {old, keys["current"]}
        cap = (
            await http.post(
                "/v1/capabilities", json={"subject": "agent:a", "scope": ["t"], "ttl_seconds": 9}
            )
        ).json()
        receipt = (
            await http.post(
                "/v1/evaluate", json={"capability_id": cap["id"], "tool_server": "s", "tool": "t"}
            )
        ).json()["receipt"]
        assert receipt["key_id"] == keys["current"]
    listed = _cli("keys", "list", "--data-dir", str(served.data_dir))
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert lines[0].startswith(f"{keys['current']}  current")
    assert lines[1].startswith(f"{old}  retired")
    as_json = json.loads(_cli("keys", "list", "--json", "--data-dir", str(served.data_dir)).stdout)
    assert as_json["current"] == keys["current"]
    seed = (served.data_dir / "signing-key.seed").read_text().strip()
    assert seed not in listed.stdout + json.dumps(as_json)


def test_keys_commands_refuse_a_missing_data_dir(tmp_path: Path) -> None:
    out = _cli("keys", "rotate", "--data-dir", str(tmp_path / "nope"))
    assert out.returncode == 2
    assert "no sidecar data directory" in out.stderr
    assert not (tmp_path / "nope").exists()
