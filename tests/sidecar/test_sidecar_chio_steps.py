"""The sidecar's one decision, signed twice: a Chio kernel receipt inside the signed step."""

from __future__ import annotations

import base64
import dataclasses
import json
from typing import Any

import httpx
import pytest

from chio_receipts import schemas
from chio_receipts.schemas import EvaluationRequest, Verdict
from chio_receipts.sidecar import LocalSidecar, SidecarStore, create_sidecar_app

pytestmark = pytest.mark.unit

SECRET = "4111-1111-secret-card"
PARAMS = {"args": [{"card": SECRET, "amount": 12.5, "note": "café ☕"}, [1, 2**40]]}


def _request(cap_id: str, tool: str = "charge", **kw: Any) -> EvaluationRequest:
    fields: dict[str, Any] = {
        "namespace": "ns",
        "workflow_id": "wf-1",
        "run_id": "run-1",
        "workflow_type": "Pay",
        "task_queue": "q",
        "activity_id": "3",
        "activity_type": tool,
        "attempt": 2,
        "argument_digest": "d" * 64,
        "argument_key_id": "args-1",
        "scheduled_at": 1_700_000_000_000_000,
        "started_at": 1_700_000_000_000_100,
        "worker_identity": "w@h",
        "prev_hash": bytes(range(32)),
        "parameters": PARAMS,
        **kw,
    }
    return EvaluationRequest(capability_id=cap_id, tool_server="payments", tool=tool, **fields)


def _trusted(side: LocalSidecar) -> set[str]:
    return side.trusted_keys()


@pytest.mark.parametrize("redact", [False, True])
@pytest.mark.parametrize(("tool", "verdict"), [("charge", Verdict.ALLOW), ("refund", Verdict.DENY)])
async def test_every_decision_carries_a_bound_chio_receipt(
    tool: str, verdict: Verdict, redact: bool
) -> None:
    side = LocalSidecar()
    cap = side.mint("agent:a", ["charge"], 60)
    signed = await side.evaluate(_request(cap.id, tool, redact_parameters=redact))
    step = signed.receipt
    assert step.verdict is verdict
    assert step.chio_receipt
    assert step.chio_signed
    assert schemas.check_chio_step(step, trusted_keys=_trusted(side)) is None
    receipt = json.loads(step.chio_receipt)
    full = schemas.verify_kernel_receipt(receipt, trusted_keys=_trusted(side))
    assert full.valid, full.reason
    # A redacted receipt signs the real parameters' hash beside empty ones: its hash cannot
    # match what it carries, and the signature holds regardless.
    assert full.parameter_hash_valid is not redact
    assert receipt["metadata"]["receipt_context"]["request_id"] == schemas.request_id_for(step)
    assert receipt["action"]["parameter_hash"] == schemas.parameter_hash(PARAMS)
    assert receipt["decision"]["verdict"] == ("allow" if verdict is Verdict.ALLOW else "deny")
    if redact:
        assert receipt["redaction_mode"] == "redacted"
        assert receipt["action"]["parameters"] == {}
        for carried in (step.chio_receipt.encode(), step.chio_signed, signed.body):
            assert SECRET.encode() not in carried
            assert "café".encode() not in carried
    else:
        assert receipt["redaction_mode"] == "none"
        assert receipt["action"]["parameters"] == PARAMS
    # The Avro signature covers the Chio fields: v1 readers keep verifying, a swap fails.
    keys = await side.public_keys()
    assert schemas.verify_receipt(step, keys)
    assert schemas.step_body(step) == signed.body
    other = await side.evaluate(_request(cap.id, tool))
    swapped = dataclasses.replace(step, chio_receipt=other.receipt.chio_receipt)
    assert not schemas.verify_receipt(swapped, keys)
    assert schemas.check_chio_step(swapped) is not None


async def test_the_chio_receipt_does_not_move_to_another_step() -> None:
    side = LocalSidecar()
    cap = side.mint("agent:a", ["charge"], 60)
    first = (await side.evaluate(_request(cap.id))).receipt
    second = (await side.evaluate(_request(cap.id, attempt=3))).receipt
    moved = dataclasses.replace(
        second, chio_receipt=first.chio_receipt, chio_signed=first.chio_signed
    )
    reason = schemas.check_chio_step(moved)
    assert reason is not None
    assert "Temporal context" in reason


async def test_a_requested_deny_and_an_unknown_capability_are_signed_denies() -> None:
    side = LocalSidecar()
    for request in (_request("", deny_reason="no grant"), _request("cap-nope")):
        step = (await side.evaluate(request)).receipt
        assert step.verdict is Verdict.DENY
        assert schemas.check_chio_step(step, trusted_keys=_trusted(side)) is None
        assert json.loads(step.chio_receipt)["decision"]["verdict"] == "deny"


async def test_a_kernel_token_binds_the_project_route_to_its_server_too() -> None:
    side = LocalSidecar()
    token = side.chio_mint("agent:a", {"grants": [_grant("payments", "charge")]}, 60)
    ok = (await side.evaluate(_request(token["id"]))).receipt
    assert ok.verdict is Verdict.ALLOW
    receipt = json.loads(ok.chio_receipt)
    assert receipt["metadata"]["attribution"]["grant_index"] == 0
    elsewhere = dataclasses.replace(_request(token["id"]), tool_server="other")
    step = (await side.evaluate(elsewhere)).receipt
    assert step.verdict is Verdict.DENY
    assert "on server 'other'" in step.reason
    assert schemas.check_chio_step(step, trusted_keys=_trusted(side)) is None


def _grant(server: str, tool: str) -> dict[str, Any]:
    return {"server_id": server, "tool_name": tool, "operations": ["invoke"]}


async def test_parameters_without_a_canonical_form_are_refused_without_quoting_them() -> None:
    side = LocalSidecar()
    cap = side.mint("agent:a", ["charge"], 60)
    with pytest.raises(schemas.ProtocolError) as caught:
        await side.evaluate(_request(cap.id, parameters={"args": [2**70], "s": SECRET}))
    assert SECRET not in str(caught.value)
    assert str(2**70) not in str(caught.value)


async def test_the_receipt_log_keeps_one_verifiable_step_row_per_decision(tmp_path: Any) -> None:
    store = SidecarStore(tmp_path / "sidecar.sqlite3")
    side = LocalSidecar(store=store)
    cap = side.mint("agent:a", ["charge"], 60)
    await side.evaluate(_request(cap.id))
    await side.evaluate(_request(cap.id, "refund", redact_parameters=True))
    assert store.log_length() == 2
    report = store.verify_log()
    assert report.ok, report.problems
    store.close()


async def test_the_served_evaluate_route_carries_the_receipt_and_the_parameters() -> None:
    side = LocalSidecar()
    cap = side.mint("agent:a", ["charge"], 60)
    app = create_sidecar_app(side)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://sidecar"
    ) as http:
        response = await http.post("/v1/evaluate", json=_request(cap.id).to_json())
        redacted = await http.post(
            "/v1/evaluate", json=_request(cap.id, redact_parameters=True).to_json()
        )
    assert response.status_code == 200, response.text
    step = schemas.receipt_from_json(response.json()["receipt"])
    body = base64.b64decode(response.json()["body"])
    assert schemas.step_body(step) == body
    assert schemas.check_chio_step(step, trusted_keys=_trusted(side)) is None
    assert json.loads(step.chio_receipt)["action"]["parameters"] == PARAMS
    assert redacted.status_code == 200, redacted.text
    assert SECRET not in redacted.text
