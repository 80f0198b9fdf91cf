"""The access table, the bind rule and the credentials file, as pure logic (no server)."""

from __future__ import annotations

import json
import os
import stat
import time
from pathlib import Path

import pytest

from chio_receipts.sidecar import (
    CredentialError,
    CredentialSet,
    Role,
    SidecarError,
    add_credential,
    check_bind,
    load_credentials,
    remove_credential,
    roles_for,
)
from chio_receipts.sidecar._api import OPERATIONS
from chio_receipts.sidecar._auth import hash_secret, new_secret

pytestmark = pytest.mark.unit

W, OP, T, A = Role.WORKER, Role.OPERATOR, Role.TOOL_SERVER, Role.ADMIN


@pytest.mark.parametrize(
    ("method", "path", "roles"),
    [
        ("POST", "/v1/evaluate", {W, A}),
        ("POST", "/v1/evaluate/advisory", {W, A}),
        ("POST", "/v1/outcomes", {W, A}),
        ("GET", "/v1/capabilities/cap-1", {W, OP, T, A}),
        ("POST", "/v1/capabilities/validate", {W, OP, T, A}),
        ("POST", "/v1/capabilities", {OP, A}),
        ("POST", "/v1/capabilities/mint", {OP, A}),
        ("POST", "/v1/capabilities/cap-1/attenuate", {OP, A}),
        ("POST", "/v1/capabilities/attenuate", {OP, A}),
        ("POST", "/v1/capabilities/cap-1/revoke", {OP, A}),
        ("POST", "/v1/capabilities/release", {OP, A}),
        ("GET", "/approvals/pending", {OP, A}),
        ("GET", "/approvals/appr-1", {OP, A}),
        ("POST", "/approvals/appr-1/respond", {OP, A}),
        ("POST", "/approvals/submit", {OP, A}),
        ("POST", "/v1/reconcile", {T, A}),
        ("POST", "/v1/keys/rotate", {A}),
        # No row: admin only (closed by default), also for a method a row does not name.
        ("POST", "/v1/something-new", {A}),
        ("DELETE", "/v1/evaluate", {A}),
        ("GET", "/v1/capabilities/cap-1/revoke", {A}),
        ("POST", "/v1/capabilities/a/b/revoke", {A}),
        # Open.
        ("GET", "/healthz", set()),
        ("GET", "/livez", set()),
        ("GET", "/readyz", set()),
        ("HEAD", "/readyz", set()),
        ("GET", "/chio/live", set()),
        ("GET", "/chio/health", set()),
        ("GET", "/metrics", set()),
        ("GET", "/openapi.json", set()),
        ("GET", "/v1/keys", set()),
        ("POST", "/v1/receipts/verify", set()),
    ],
)
def test_the_route_table(method: str, path: str, roles: set[Role]) -> None:
    assert roles_for(method, path) == roles


def test_only_reconcile_refuses_the_local_caller() -> None:
    from chio_receipts.sidecar._access import ROUTE_ROLES

    assert [(r.method, r.path) for r in ROUTE_ROLES if not r.local] == [("POST", "/v1/reconcile")]


def test_every_operation_has_a_row_that_agrees_with_its_auth_flag() -> None:
    for op in OPERATIONS:
        path = op.path.replace("{cap_id}", "cap-1")
        roles = roles_for(op.method, path)
        assert bool(roles) == op.auth, op.name
        assert Role.ADMIN in roles or not roles, op.name


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost"])
def test_loopback_binds_need_no_credentials(host: str) -> None:
    check_bind(host, None)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3", "sidecar.internal"])
def test_other_binds_need_credentials(host: str) -> None:
    with pytest.raises(SidecarError, match="without credentials") as refused:
        check_bind(host, None)
    assert "\n" not in str(refused.value)
    with pytest.raises(SidecarError):
        check_bind(host, CredentialSet())
    check_bind(host, CredentialSet.from_token("x" * 32))


def test_secrets_are_random_and_only_their_hash_is_stored(tmp_path: Path) -> None:
    assert len({new_secret() for _ in range(100)}) == 100
    assert len(new_secret()) == len("chio_") + 43  # 32 bytes, URL-safe base64 without padding
    path = tmp_path / "creds.json"
    secret = add_credential(path, "worker-1", Role.WORKER)
    text = path.read_text()
    assert secret not in text
    assert hash_secret(secret) in text
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    document = json.loads(text)
    assert document["version"] == 1
    assert document["credentials"][0]["name"] == "worker-1"
    assert document["credentials"][0]["role"] == "worker"
    rows = load_credentials(path)
    assert [(r.name, r.role) for r in rows] == [("worker-1", Role.WORKER)]
    with pytest.raises(CredentialError, match="exists"):
        add_credential(path, "worker-1", Role.ADMIN)
    with pytest.raises(CredentialError, match="name"):
        add_credential(path, "bad name", Role.ADMIN)


def test_authenticate_by_secret_and_nothing_else(tmp_path: Path) -> None:
    path = tmp_path / "creds.json"
    worker = add_credential(path, "worker-1", Role.WORKER)
    admin = add_credential(path, "root", Role.ADMIN)
    creds = CredentialSet(path=path)
    assert len(creds) == 2
    found = creds.authenticate(f"Bearer {worker}")
    assert found is not None
    assert (found.name, found.role) == ("worker-1", Role.WORKER)
    found = creds.authenticate(f"bearer   {admin}  ")
    assert found is not None
    assert found.role is Role.ADMIN
    for header in (None, "", "Bearer", f"Basic {worker}", worker, f"Bearer {worker}x"):
        assert creds.authenticate(header) is None, header
    # The stored hash is not a secret that works.
    assert creds.authenticate(f"Bearer {hash_secret(worker)}") is None


def test_a_changed_file_is_picked_up_and_a_broken_one_keeps_the_last_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "creds.json"
    first = add_credential(path, "a", Role.WORKER)
    creds = CredentialSet(path=path)
    clock = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    second = add_credential(path, "b", Role.OPERATOR)
    assert remove_credential(path, "a")
    assert not remove_credential(path, "a")
    clock[0] += 2
    assert creds.authenticate(f"Bearer {first}") is None
    assert creds.authenticate(f"Bearer {second}") is not None
    path.write_text("{not json")
    os.utime(path, ns=(1, 1))
    clock[0] += 2
    assert creds.authenticate(f"Bearer {second}") is not None


@pytest.mark.parametrize(
    ("document", "match"),
    [
        ("[]", "version"),
        ('{"version": 2, "credentials": []}', "version"),
        ('{"version": 1}', "list"),
        ('{"version": 1, "credentials": [1]}', "object"),
        ('{"version": 1, "credentials": [{"name": "a", "role": "root", "hash": "x"}]}', "role"),
        ('{"version": 1, "credentials": [{"name": "a", "role": "worker", "hash": "x"}]}', "hash"),
    ],
)
def test_invalid_files_are_refused(tmp_path: Path, document: str, match: str) -> None:
    path = tmp_path / "creds.json"
    path.write_text(document)
    with pytest.raises(CredentialError, match=match):
        CredentialSet(path=path)


def test_one_secret_cannot_be_two_credentials(tmp_path: Path) -> None:
    path = tmp_path / "creds.json"
    secret = add_credential(path, "worker-1", Role.WORKER)
    creds = CredentialSet(path=path)
    # The deprecated admin token must never be a worker's secret.
    with pytest.raises(CredentialError, match="same secret"):
        creds.add_token(secret)
    with pytest.raises(CredentialError, match=r"no credentials file"):
        CredentialSet(path=tmp_path / "absent.json")


def test_credential_of_never_invents_a_caller() -> None:
    from starlette.requests import Request

    from chio_receipts.sidecar import Credential, credential_of
    from chio_receipts.sidecar._auth import LOCAL

    def request(state: dict[str, object] | None) -> Request:
        scope: dict[str, object] = {"type": "http", "method": "GET", "path": "/", "headers": []}
        if state is not None:
            scope["state"] = state
        return Request(scope)

    alice = Credential("alice", Role.OPERATOR)
    assert credential_of(request({"credential": alice})) is alice
    # An open route called without a credential (the middleware set None): no default caller.
    with pytest.raises(PermissionError):
        credential_of(request({"credential": None}))
    # No access middleware at all (a handler under test): the local admin.
    assert credential_of(request(None)) is LOCAL
    assert credential_of(request({})) is LOCAL
