"""Conformance smoke test against the real kernel's sidecar (``chio-kernel-sidecar``).

chio-api-protect 0.1.2's ``ProtectProxy``, configured as ``chio start`` configures it, runs on a
free loopback port with a temp state dir and a control token. We mint a capability, evaluate an
in-scope and an out-of-scope call, release the capability, and check every signed artefact with
the project's own verifiers, trusting only the key derived from the sidecar's seed file.

The sidecar runs with ephemeral receipts (``--ephemeral-receipts``): with a durable receipt
store 0.1.2 denies every side-effecting call (see ``test_durable_receipts_deny_every_call``),
so the allow path is only reachable in the ephemeral mode. The budget store stays durable.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import nacl.signing
import pytest

import chio_receipts.schemas as schemas
from tests.support.kernel import kernel_binary

pytestmark = pytest.mark.kernel

CONTROL_TOKEN = "kernel-test-control-" + uuid.uuid4().hex
SCOPE = "tool:temporal:charge_card:invoke"
READY_LINE = "chio sidecar listening on "


@dataclass
class Sidecar:
    url: str
    state_dir: Path
    process: subprocess.Popen[str]

    @property
    def kernel_key(self) -> str:
        """The public key of the persisted signer seed: our trust anchor, not the sidecar's word."""
        seed = (self.state_dir / "authority.seed").read_text("ascii").strip()
        return bytes(nacl.signing.SigningKey(bytes.fromhex(seed)).verify_key).hex()

    def client(self, *, control: bool = False) -> httpx.Client:
        headers = {"Authorization": f"Bearer {CONTROL_TOKEN}"} if control else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=10.0)


def _start(state_dir: Path, extra_args: Sequence[str]) -> Sidecar:
    binary = kernel_binary("chio-kernel-sidecar")
    env = {**os.environ, "CHIO_SIDECAR_CONTROL_TOKEN": CONTROL_TOKEN, "RUST_LOG": "warn"}
    stderr = (state_dir.parent / f"{state_dir.name}.stderr").open("w")
    process = subprocess.Popen(
        [str(binary), "--state-dir", str(state_dir), "--listen", "127.0.0.1:0", *extra_args],
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
        env=env,
    )
    stderr.close()
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            lines.put(line)

    threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=0.5)
        except queue.Empty:
            if process.poll() is not None:
                break
            continue
        if line.startswith(READY_LINE):
            return Sidecar(line[len(READY_LINE) :].strip(), state_dir, process)
    process.kill()
    process.wait()
    log = (state_dir.parent / f"{state_dir.name}.stderr").read_text(errors="replace")
    pytest.fail(f"chio-kernel-sidecar did not start:\n{log[-3000:]}", pytrace=False)


def _stop(sidecar: Sidecar) -> None:
    sidecar.process.terminate()
    try:
        sidecar.process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        sidecar.process.kill()
        sidecar.process.wait()


@pytest.fixture(scope="module")
def sidecar(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sidecar]:
    running = _start(tmp_path_factory.mktemp("kernel") / "state", ["--ephemeral-receipts"])
    try:
        yield running
    finally:
        _stop(running)


def _mint(sidecar: Sidecar, subject: str, scopes: list[str]) -> dict[str, Any]:
    with sidecar.client(control=True) as http:
        response = http.post(
            "/v1/capabilities/mint", json={"subject": subject, "scopes": scopes, "ttl_seconds": 600}
        )
    assert response.status_code == 200, response.text
    token: dict[str, Any] = response.json()["capability"]
    return token


def _evaluate(
    sidecar: Sidecar, token: dict[str, Any], tool: str, parameters: dict[str, Any]
) -> httpx.Response:
    with sidecar.client() as http:  # /v1/evaluate takes no bearer token
        return http.post(
            "/v1/evaluate",
            json={
                "capability": token,
                "tool_server": "temporal",
                "tool_name": tool,
                "parameters": parameters,
                "request_id": f"req-{uuid.uuid4().hex}",
            },
        )


def _check_receipt(
    sidecar: Sidecar,
    receipt: dict[str, Any],
    token: dict[str, Any],
    tool: str,
    parameters: dict[str, Any],
    verdict: str,
) -> None:
    result = schemas.verify_kernel_receipt(receipt, trusted_keys=[sidecar.kernel_key])
    assert result.valid, result.reason
    assert result.parameter_hash_valid
    assert receipt["decision"]["verdict"] == verdict
    assert receipt["capability_id"] == token["id"]
    assert (receipt["tool_server"], receipt["tool_name"]) == ("temporal", tool)
    assert receipt["action"]["parameters"] == parameters
    assert receipt["action"]["parameter_hash"] == schemas.parameter_hash(parameters)
    assert (receipt["receipt_kind"], receipt["boundary_class"], receipt["trust_level"]) == (
        "mediated_decision",
        "prevent",
        "mediated",
    )
    # One changed byte and our verifier must refuse it.
    forged = {**receipt, "tool_name": tool + "x"}
    assert not schemas.verify_kernel_receipt(forged, trusted_keys=[sidecar.kernel_key]).valid
    # And the kernel's key is the only one trusted.
    other = bytes(nacl.signing.SigningKey(bytes(32)).verify_key).hex()
    assert not schemas.verify_kernel_receipt(receipt, trusted_keys=[other]).valid


def test_health_answers(sidecar: Sidecar) -> None:
    with sidecar.client() as http:
        response = http.get("/chio/health")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "healthy"
    assert body["version"] == "0.1.2"
    assert body["receipt_backend"] == "ephemeral"


def test_control_routes_need_the_bearer_token(sidecar: Sidecar) -> None:
    body = {"subject": "agent-1", "scopes": [SCOPE]}
    with sidecar.client() as http:
        missing = http.post("/v1/capabilities/mint", json=body)
        wrong = http.post(
            "/v1/capabilities/mint", json=body, headers={"Authorization": "Bearer nope"}
        )
    for response in (missing, wrong):
        assert response.status_code == 403, response.text
        assert response.json()["error"] == "chio_control_forbidden"


def test_minted_token_verifies_with_our_verifier(sidecar: Sidecar) -> None:
    token = _mint(sidecar, "agent-mint", [SCOPE])
    assert token["issuer"] == sidecar.kernel_key
    assert token["schema"] == schemas.CAPABILITY_SCHEMA
    assert token["scope"]["grants"] == [
        {"server_id": "temporal", "tool_name": "charge_card", "operations": ["invoke"]}
    ]
    result = schemas.verify_capability_token(token, now=int(time.time()))
    assert result.valid, result.reason
    assert token["expires_at"] - token["issued_at"] == 600
    forged = {**token, "expires_at": token["expires_at"] + 3600}
    assert not schemas.verify_capability_token(forged).valid


def test_in_scope_call_is_authorized_and_out_of_scope_denied(sidecar: Sidecar) -> None:
    token = _mint(sidecar, "agent-evaluate", [SCOPE])
    parameters = {"amount": 12.5, "currency": "EUR", "note": "café ☕", "ratio": 0.1 + 0.2}

    allowed = _evaluate(sidecar, token, "charge_card", parameters)
    assert allowed.status_code == 200, allowed.text
    assert allowed.json()["status"] == "authorized", allowed.text
    receipt = allowed.json()["receipt"]
    # The kernel's allow is a pre-execution authorization: the receipt's verdict is
    # "incomplete" until the tool runs, and the call is bound by a signed execution nonce.
    _check_receipt(sidecar, receipt, token, "charge_card", parameters, "incomplete")
    assert receipt["decision"]["reason"].startswith("pre-execution authorization reserved")
    assert receipt["metadata"]["execution_nonce"]["stage"] == "authorization"
    assert receipt["metadata"]["execution_nonce"]["tool_dispatched"] is False
    nonce = allowed.json()["execution_nonce"]
    assert nonce["nonce"]["bound_to"] == {
        "subject_id": token["subject"],
        "request_id": receipt["metadata"]["receipt_context"]["request_id"],
        "capability_id": token["id"],
        "tool_server": "temporal",
        "tool_name": "charge_card",
        "parameter_hash": schemas.parameter_hash(parameters),
    }
    verify_key = nacl.signing.VerifyKey(bytes.fromhex(sidecar.kernel_key))
    verify_key.verify(schemas.canonical_json(nonce["nonce"]), bytes.fromhex(nonce["signature"]))

    denied = _evaluate(sidecar, token, "refund_card", parameters)
    assert denied.status_code == 200, denied.text
    assert denied.json()["status"] == "deny", denied.text
    assert denied.json()["execution_nonce"] is None
    receipt = denied.json()["receipt"]
    _check_receipt(sidecar, receipt, token, "refund_card", parameters, "deny")
    assert receipt["decision"]["guard"] == "kernel"
    assert "not in capability scope" in receipt["decision"]["reason"]


def test_released_capability_is_denied(sidecar: Sidecar) -> None:
    token = _mint(sidecar, "agent-release", [SCOPE])
    before = _evaluate(sidecar, token, "charge_card", {"amount": 1})
    assert before.status_code == 200, before.text
    assert before.json()["status"] == "authorized", before.text
    assert before.json()["receipt"]["decision"]["verdict"] == "incomplete"

    with sidecar.client(control=True) as http:
        released = http.post("/v1/capabilities/release", json={"capability_id": token["id"]})
        assert released.status_code == 200, released.text
        assert released.json() == {"released": True}
        validated = http.post("/v1/capabilities/validate", json=token)
    assert validated.status_code == 200, validated.text
    assert validated.json()["valid"] is False

    after = _evaluate(sidecar, token, "charge_card", {"amount": 1})
    assert after.status_code == 403, after.text
    assert after.json()["error"] == "chio_capability_revoked"
    # The token itself is still a well-signed token: revocation is state, not signature.
    assert schemas.verify_capability_token(token).valid


def test_kernel_receipts_pass_the_kernel_verifier_too(
    sidecar: Sidecar, kernel_verify: Callable[[Sequence[str], str], list[str]]
) -> None:
    token = _mint(sidecar, "agent-oracle", [SCOPE])
    receipts = [
        _evaluate(sidecar, token, tool, {"n": 2**53 - 1, "s": "日本"}).json()["receipt"]
        for tool in ("charge_card", "refund_card")
    ]
    assert kernel_verify([json.dumps(r) for r in receipts], "receipts") == ["valid", "valid"]
    assert kernel_verify([json.dumps(token)], "capabilities") == ["valid"]


def test_durable_receipts_deny_every_call(tmp_path: Path) -> None:
    # Why the tests run the ephemeral mode: with a durable receipt store the mediation kernel
    # has durable admission but no atomic admission participant, so 0.1.2 denies the in-scope
    # call too (with a well-signed deny receipt). If a release changes that, this fails.
    durable = _start(tmp_path / "state", [])
    try:
        with durable.client() as http:
            assert http.get("/chio/health").json()["receipt_backend"] == "durable"
        token = _mint(durable, "agent-durable", [SCOPE])
        response = _evaluate(durable, token, "charge_card", {"amount": 1})
        assert response.status_code == 200, response.text
        assert response.json()["status"] == "deny", response.text
        receipt = response.json()["receipt"]
        _check_receipt(durable, receipt, token, "charge_card", {"amount": 1}, "deny")
        assert "atomic admission participant" in receipt["decision"]["reason"]
    finally:
        _stop(durable)
