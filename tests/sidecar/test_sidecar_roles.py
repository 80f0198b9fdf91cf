"""Access roles on the served sidecar, over real HTTP: 401, 403 and 200 by role, key rotation by
an admin, the refusal to bind anything but loopback without credentials, and secrets that never
reach the logs."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from chio_receipts.sidecar import (
    DataDir,
    LocalSidecar,
    Role,
    SidecarError,
    SidecarServer,
    add_credential,
)
from chio_receipts.sidecar._auth import CredentialSet

WORKER_DENIED = [
    # (method, path, body): what a worker may not do. Some routes are not served yet (approvals,
    # reconcile): the middleware still answers 403 before any route is looked up.
    ("POST", "/v1/capabilities", {"subject": "s", "scope": ["read"], "ttl_seconds": 60}),
    ("POST", "/v1/capabilities/mint", {"subject": "s", "scopes": ["tool:srv:read:invoke"]}),
    ("POST", "/v1/capabilities/{cap}/attenuate", {"scope": ["read"]}),
    ("POST", "/v1/capabilities/attenuate", {"parent_token": {}, "new_scope": {}}),
    ("POST", "/v1/capabilities/{cap}/revoke", {}),
    ("POST", "/v1/capabilities/release", {"capability_id": "{cap}"}),
    ("GET", "/approvals/pending", None),
    ("POST", "/approvals/appr-1/respond", {"approved": True}),
    ("POST", "/approvals/submit", {}),
    ("POST", "/v1/reconcile", {"execution_nonce": "n", "realized_cost": 0}),
    ("POST", "/v1/keys/rotate", {}),
]


@dataclass
class Served:
    url: str
    secrets: dict[Role, str]
    server: SidecarServer
    side: LocalSidecar
    data_dir: Path

    def auth(self, role: Role) -> dict[str, str]:
        return {"authorization": f"Bearer {self.secrets[role]}"}


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[Served]:
    creds = tmp_path / "credentials.json"
    secrets = {role: add_credential(creds, f"{role.value}-1", role) for role in Role}
    with DataDir(tmp_path / "side") as directory:
        side = LocalSidecar(directory.signing_key(), store=directory.store)
        server = SidecarServer(side, credentials=CredentialSet(path=creds), data_dir=directory)
        async with server:
            yield Served(server.url, secrets, server, side, directory.path)


def _auth_failures(text: str) -> dict[str, float]:
    return {
        s.labels["status"]: s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "chio_sidecar_auth_failures_total"
    }


async def _call(
    http: httpx.AsyncClient, method: str, path: str, body: object, headers: dict[str, str]
) -> httpx.Response:
    if method == "GET":
        return await http.get(path, headers=headers)
    return await http.post(path, json=body, headers=headers)


async def test_missing_or_wrong_credential_is_401_and_says_nothing_of_names(
    served: Served,
) -> None:
    async with httpx.AsyncClient(base_url=served.url) as http:
        answers = [
            await http.post("/v1/evaluate", json={}),
            await http.post("/v1/evaluate", json={}, headers={"authorization": "Bearer nope"}),
            await http.post(
                "/v1/evaluate",
                json={},
                headers={"authorization": f"Bearer {served.secrets[Role.WORKER]}0"},
            ),
            await http.post(
                "/v1/evaluate",
                json={},
                headers={"authorization": f"Basic {served.secrets[Role.WORKER]}"},
            ),
            await http.post("/v1/keys/rotate", headers={"authorization": "Bearer admin-1"}),
            await http.get("/approvals/pending"),
            await http.post("/v1/unknown-route"),
        ]
        for answer in answers:
            assert answer.status_code == 401, (answer.request.url, answer.text)
            assert answer.json() == {
                "error": "unauthorized",
                "reason": "missing or wrong credential",
            }
            assert answer.headers["www-authenticate"].startswith("Bearer")
        # Open routes stay open.
        for path in ("/healthz", "/livez", "/readyz", "/chio/live", "/chio/health", "/metrics"):
            assert (await http.get(path)).status_code == 200, path
        assert (await http.get("/v1/keys")).status_code == 200
        scraped = _auth_failures((await http.get("/metrics")).text)
    assert scraped == {"401": len(answers), "403": 0}


async def test_a_worker_may_evaluate_but_not_mint_approve_reconcile_or_rotate(
    served: Served,
) -> None:
    async with httpx.AsyncClient(base_url=served.url) as http:
        minted = await http.post(
            "/v1/capabilities",
            json={"subject": "agent:a", "scope": ["read"], "ttl_seconds": 60},
            headers=served.auth(Role.OPERATOR),
        )
        assert minted.status_code == 201, minted.text
        cap = minted.json()["id"]
        for method, path, body in WORKER_DENIED:
            path = path.replace("{cap}", cap)
            if isinstance(body, dict):
                body = {
                    k: (v.replace("{cap}", cap) if isinstance(v, str) else v)
                    for k, v in body.items()
                }
            answer = await _call(http, method, path, body, served.auth(Role.WORKER))
            assert answer.status_code == 403, (method, path, answer.text)
            assert answer.json()["error"] == "forbidden"
            assert "worker" in answer.json()["reason"]
        # The refused calls did nothing: the capability is not revoked, the key not rotated.
        key_before = served.side.key_id
        evaluated = await http.post(
            "/v1/evaluate",
            json={"capability_id": cap, "tool_server": "srv", "tool": "read"},
            headers=served.auth(Role.WORKER),
        )
        assert evaluated.status_code == 200, evaluated.text
        assert evaluated.json()["receipt"]["verdict"] == "ALLOW"
        assert served.side.key_id == key_before
        # What a worker may also do: read the capability, validate, read the keys.
        got = await http.get(f"/v1/capabilities/{cap}", headers=served.auth(Role.WORKER))
        assert got.status_code == 200
        scraped = _auth_failures((await http.get("/metrics")).text)
    assert scraped == {"401": 0, "403": len(WORKER_DENIED)}


async def test_each_role_gets_its_own_routes(served: Served) -> None:
    async with httpx.AsyncClient(base_url=served.url) as http:
        # operator: mint (both routes), attenuate, revoke.
        minted = await http.post(
            "/v1/capabilities",
            json={"subject": "agent:a", "scope": ["read", "write"], "ttl_seconds": 60},
            headers=served.auth(Role.OPERATOR),
        )
        assert minted.status_code == 201
        cap = minted.json()["id"]
        kernel = await http.post(
            "/v1/capabilities/mint",
            json={"subject": "agent:a", "scopes": ["tool:srv:read:invoke"]},
            headers=served.auth(Role.OPERATOR),
        )
        assert kernel.status_code == 200
        child = await http.post(
            f"/v1/capabilities/{cap}/attenuate",
            json={"scope": ["read"]},
            headers=served.auth(Role.OPERATOR),
        )
        assert child.status_code == 201
        # An operator may not evaluate, reconcile or rotate.
        for method, path in (
            ("POST", "/v1/evaluate"),
            ("POST", "/v1/reconcile"),
            ("POST", "/v1/keys/rotate"),
        ):
            refused = await _call(http, method, path, {}, served.auth(Role.OPERATOR))
            assert refused.status_code == 403, path
        # tool_server: reconcile passes the middleware (the route itself is another part's; until
        # it is served, the router answers 404), and nothing else of the operator's.
        reconcile = await http.post("/v1/reconcile", json={}, headers=served.auth(Role.TOOL_SERVER))
        assert reconcile.status_code not in (401, 403), reconcile.text
        refused = await http.post(
            "/v1/capabilities/mint",
            json={"subject": "s", "scopes": []},
            headers=served.auth(Role.TOOL_SERVER),
        )
        assert refused.status_code == 403
        # admin: everything, including the worker's and the operator's routes.
        evaluated = await http.post(
            "/v1/evaluate",
            json={"capability_id": cap, "tool_server": "srv", "tool": "write"},
            headers=served.auth(Role.ADMIN),
        )
        assert evaluated.status_code == 200
        revoked = await http.post(
            f"/v1/capabilities/{cap}/revoke", headers=served.auth(Role.OPERATOR)
        )
        assert revoked.status_code == 200
        # A path nobody has a row for: admin passes the middleware (then 404), others 403.
        assert (await http.get("/v1/nothing", headers=served.auth(Role.ADMIN))).status_code == 404
        assert (
            await http.get("/v1/nothing", headers=served.auth(Role.OPERATOR))
        ).status_code == 403


async def test_an_admin_rotates_the_key_and_is_named_in_the_log(
    served: Served, caplog: pytest.LogCaptureFixture
) -> None:
    old = served.side.key_id
    caplog.set_level(logging.INFO, logger="chio_receipts.sidecar")
    async with httpx.AsyncClient(base_url=served.url) as http:
        rotated = await http.post("/v1/keys/rotate", headers=served.auth(Role.ADMIN))
        assert rotated.status_code == 200, rotated.text
        body = rotated.json()
        assert body["old_key_id"] == old
        assert body["current"] == served.side.key_id != old
        keys = (await http.get("/v1/keys")).json()
        assert keys["current"] == body["current"]
        assert {k["key_id"] for k in keys["keys"]} == {old, body["current"]}
        # The new key is the data directory's: a restart signs with it.
        with DataDir(served.data_dir) as again:
            assert again.signing_key().key_id == body["current"]
        assert (await http.get("/readyz")).json()["status"] == "ready"
        # Receipts are signed by the new key.
        cap = await http.post(
            "/v1/capabilities",
            json={"subject": "agent:a", "scope": ["read"], "ttl_seconds": 60},
            headers=served.auth(Role.ADMIN),
        )
        evaluated = await http.post(
            "/v1/evaluate",
            json={"capability_id": cap.json()["id"], "tool_server": "srv", "tool": "read"},
            headers=served.auth(Role.WORKER),
        )
        assert evaluated.json()["receipt"]["key_id"] == body["current"]
    # The caller is the authenticated credential (request.state.credential), by name.
    assert any("by credential admin-1" in r.getMessage() for r in caplog.records)


async def test_without_credentials_loopback_callers_are_admin(tmp_path: Path) -> None:
    side = LocalSidecar()
    async with SidecarServer(side) as server, httpx.AsyncClient(base_url=server.url) as http:
        rotated = await http.post("/v1/keys/rotate")
        assert rotated.status_code == 200
        assert rotated.json()["current"] == side.key_id
        minted = await http.post(
            "/v1/capabilities", json={"subject": "s", "scope": ["read"], "ttl_seconds": 60}
        )
        assert minted.status_code == 201
        # Except reconcile: the controlled agent is on loopback too, so settling a budget hold
        # needs a configured tool_server credential (fail closed, as the kernel's gate).
        reconcile = await http.post("/v1/reconcile", json={})
        assert reconcile.status_code == 403
        assert reconcile.json()["error"] == "forbidden"
        assert "--credentials" in reconcile.json()["reason"]


async def test_the_embedded_server_refuses_other_binds_without_credentials() -> None:
    with pytest.raises(SidecarError, match=r"refusing to serve on 0\.0\.0\.0 without credentials"):
        SidecarServer(LocalSidecar(), host="0.0.0.0")


# -- the `sidecar serve` process ------------------------------------------------------------------


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "chio_receipts", *args]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _clean_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHIO_SIDECAR")}
    env["CHIO_DATA_DIR"] = str(tmp_path / "data")
    return env


def test_serving_other_than_loopback_without_credentials_is_refused_in_one_line(
    tmp_path: Path,
) -> None:
    for host in ("0.0.0.0", "::"):
        done = subprocess.run(
            _cli("sidecar", "serve", "--host", host, "--ephemeral"),
            env=_clean_env(tmp_path),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 2, done.stderr
        lines = done.stderr.strip().splitlines()
        assert lines == [
            f"error: refusing to serve on {host} without credentials: give --credentials FILE "
            "(see 'chio-receipts sidecar credential add') or bind to 127.0.0.1"
        ], done.stderr
        assert done.stdout == ""


def test_credential_commands_print_the_secret_once_and_never_again(tmp_path: Path) -> None:
    path = tmp_path / "creds.json"
    env = _clean_env(tmp_path)
    added = subprocess.run(
        _cli("sidecar", "credential", "add", "w1", "--role", "worker", "--file", str(path)),
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    secret = added.stdout.strip()
    assert secret.startswith("chio_")
    assert len(secret) == 48
    assert secret not in added.stderr
    env["CHIO_SIDECAR_CREDENTIALS"] = str(path)
    listed = subprocess.run(
        _cli("sidecar", "credential", "list"), env=env, capture_output=True, text=True, check=True
    )
    assert listed.stdout.split()[:2] == ["w1", "worker"]
    assert secret not in listed.stdout + listed.stderr
    assert secret not in path.read_text()
    removed = subprocess.run(
        _cli("sidecar", "credential", "remove", "w1"), env=env, capture_output=True, text=True
    )
    assert removed.returncode == 0, removed.stderr
    again = subprocess.run(
        _cli("sidecar", "credential", "remove", "w1"), env=env, capture_output=True, text=True
    )
    assert again.returncode == 2
    assert "no credential named 'w1'" in again.stderr


def test_secrets_never_reach_the_served_sidecars_log(tmp_path: Path) -> None:
    creds = tmp_path / "creds.json"
    worker = add_credential(creds, "w1", Role.WORKER)
    admin = add_credential(creds, "root", Role.ADMIN)
    legacy = "legacy-shared-token-" + "9" * 20
    wrong = "chio_wrong-secret-that-must-not-be-logged"
    port = _free_port()
    env = {**_clean_env(tmp_path), "CHIO_SIDECAR_TOKEN": legacy}
    proc = subprocess.Popen(
        _cli(
            "sidecar",
            "serve",
            # Anything but loopback is accepted with credentials.
            "--host",
            "0.0.0.0",
            "--port",
            str(port),
            "--credentials",
            str(creds),
            "--data-dir",
            str(tmp_path / "side"),
            "--log-level",
            "debug",
        ),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/livez", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, proc.communicate()[0]
            assert time.monotonic() < deadline
            time.sleep(0.1)
        with httpx.Client(base_url=url, timeout=10) as http:
            for secret, expected in ((worker, 403), (admin, 201), (legacy, 201), (wrong, 401)):
                answer = http.post(
                    "/v1/capabilities",
                    json={"subject": "s", "scope": ["read"], "ttl_seconds": 60},
                    headers={"authorization": f"Bearer {secret}"},
                )
                assert answer.status_code == expected, (expected, answer.text)
                assert secret not in answer.text
            assert http.post(
                "/v1/keys/rotate", headers={"authorization": f"Bearer {admin}"}
            ).is_success
    finally:
        proc.terminate()
        output, _ = proc.communicate(timeout=30)
    # The log is real (uvicorn's access lines, the rotation with the credential's name)...
    assert "POST /v1/capabilities" in output, output
    assert "by credential root" in output, output
    assert "--token (CHIO_SIDECAR_TOKEN) is deprecated" in output
    # ...and holds no secret, right or wrong, nor a stored hash.
    for secret in (worker, admin, legacy, wrong):
        assert secret not in output
    assert "sha256:" not in output


def test_serve_refuses_an_unreadable_credentials_file_in_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "creds.json"
    for content, expected in ((None, "no credentials file"), ("{}", "expected an object")):
        if content is not None:
            bad.write_text(content)
        done = subprocess.run(
            _cli("sidecar", "serve", "--ephemeral", "--credentials", str(bad)),
            env=_clean_env(tmp_path),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 2, done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1, done.stderr
        assert lines[0].startswith("error: ")
        assert expected in lines[0]
