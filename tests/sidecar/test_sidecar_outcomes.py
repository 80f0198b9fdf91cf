"""``POST /v1/outcomes``: the sidecar signs outcome records with the key that signs decisions.

In process over the ASGI transport (validation, auth, the document) and over real HTTP on
loopback (the worker's ``HttpSidecar`` client, the metrics)."""

from __future__ import annotations

import dataclasses
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from chio_receipts.interceptor import ChioKernelSidecar, HttpSidecar
from chio_receipts.schemas import (
    StepOutcome,
    StepStatus,
    check_chio_outcome,
    uuid7,
)
from chio_receipts.sidecar import LocalSidecar, SidecarServer, create_sidecar_app, openapi_document
from chio_receipts.sidecar._chio import POLICY_HASH

pytestmark = pytest.mark.unit


def _outcome(**kw: Any) -> StepOutcome:
    fields: dict[str, Any] = {
        "outcome_id": uuid7(),
        "namespace": "default",
        "workflow_id": "wf-1",
        "run_id": "run-1",
        "workflow_type": "Pay",
        "task_queue": "tq",
        "activity_id": "1",
        "activity_type": "charge",
        "attempt": 1,
        "is_local": False,
        "tool_server": "payments",
        "tool": "charge",
        "capability_id": "cap-1",
        "decision_receipt_id": uuid7(),
        "decision_chio_id": "ab" * 32,
        "status": StepStatus.FAILED,
        "error_type": "CardDeclined",
        "started_at": 1_700_000_000_000_000,
        "ended_at": 1_700_000_000_250_000,
        "duration_us": 250_000,
        "result_digest": "",
        "result_key_id": "",
        "worker_identity": "w@host",
        "trace_id": "0af7651916cd43dd8448eb211c80319c",
        "span_id": "b7ad6b7169203331",
    }
    fields.update(kw)
    return StepOutcome(**fields)


def _body(outcome: StepOutcome) -> dict[str, Any]:
    body = outcome.to_avro()
    del body["chio_receipt"], body["chio_signed"]
    return body


def _client(side: LocalSidecar, token: str | None = None) -> httpx.AsyncClient:
    app = create_sidecar_app(side, token=token, max_body_bytes=4096)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://sidecar")


async def test_the_route_signs_the_record_as_sent_with_the_decision_key() -> None:
    side = LocalSidecar()
    outcome = _outcome()
    async with _client(side) as http:
        answer = await http.post("/v1/outcomes", json=_body(outcome))
    assert answer.status_code == 200
    record = answer.json()["outcome"]
    assert {k: v for k, v in record.items() if not k.startswith("chio_")} == _body(outcome)
    signed = dataclasses.replace(
        outcome,
        chio_receipt=record["chio_receipt"],
        chio_signed=bytes.fromhex(record["chio_signed"]),
    )
    own_key = {side.trusted_keys().pop()}
    assert check_chio_outcome(signed, trusted_keys=own_key) is None
    # The record is bound: a changed field no longer holds.
    tampered = dataclasses.replace(signed, error_type="Other")
    assert check_chio_outcome(tampered, trusted_keys=own_key) is not None
    assert check_chio_outcome(signed, trusted_keys={"00" * 32}) is not None
    assert f'"policy_hash":"{POLICY_HASH}"' in record["chio_receipt"]


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ({"status": "DONE"}, "invalid_field"),
        ({"status": "UNKNOWN"}, "invalid_field"),
        ({"attempt": "1"}, "invalid_field"),
        ({"duration_us": -1}, "invalid_field"),
        ({"result_digest": "not-hex"}, "invalid_field"),
        ({"trace_id": "XYZ"}, "invalid_field"),
        ({"outcome_id": "not-a-uuid"}, "invalid_field"),
        ({"workflow_id": None}, "invalid_field"),
    ],
)
async def test_a_malformed_record_is_refused_with_a_reason(
    change: dict[str, Any], error: str
) -> None:
    body = {**_body(_outcome()), **change}
    async with _client(LocalSidecar()) as http:
        answer = await http.post("/v1/outcomes", json=body)
    assert answer.status_code == 422
    assert answer.json()["error"] == error
    assert answer.json()["reason"]


async def test_a_missing_field_and_a_non_object_are_refused() -> None:
    body = _body(_outcome())
    del body["decision_receipt_id"]
    async with _client(LocalSidecar()) as http:
        missing = await http.post("/v1/outcomes", json=body)
        listed = await http.post("/v1/outcomes", json=[1])
        broken = await http.post("/v1/outcomes", content=b"{")
    assert (missing.status_code, missing.json()["error"]) == (422, "missing_field")
    assert "decision_receipt_id" in missing.json()["reason"]
    assert (listed.status_code, listed.json()["error"]) == (422, "invalid_request")
    assert (broken.status_code, broken.json()["error"]) == (400, "malformed_json")


async def test_the_route_takes_the_bearer_token_like_evaluate() -> None:
    body = _body(_outcome())
    async with _client(LocalSidecar(), token="s3cret") as http:
        refused = await http.post("/v1/outcomes", json=body)
        taken = await http.post(
            "/v1/outcomes", json=body, headers={"authorization": "Bearer s3cret"}
        )
    assert refused.status_code == 401
    assert taken.status_code == 200


def test_the_route_is_documented() -> None:
    doc = openapi_document()
    post = doc["paths"]["/v1/outcomes"]["post"]
    assert post["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/OutcomeBody"
    }
    assert set(post["responses"]) == {"200", "400", "401", "403", "413", "422"}
    fields = doc["components"]["schemas"]["OutcomeBody"]["properties"]
    assert "result_digest" in fields
    assert "result" not in fields


async def test_the_worker_client_gets_a_checked_signature_and_metrics_count_it() -> None:
    side = LocalSidecar()
    async with (
        SidecarServer(side, token="tok") as server,
        HttpSidecar(server.url, token="tok") as client,
    ):
        outcome = _outcome(status=StepStatus.COMPLETED, error_type="", result_digest="cd" * 32)
        signed = await client.record_outcome(outcome)
        assert dataclasses.replace(signed, chio_receipt="", chio_signed=b"") == outcome
        assert check_chio_outcome(signed, trusted_keys=side.trusted_keys()) is None
        async with httpx.AsyncClient(base_url=server.url) as http:
            text = (await http.get("/metrics")).text
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    assert samples[("chio_sidecar_outcomes_total", (("status", "COMPLETED"),))] == 1
    assert samples[("chio_sidecar_outcomes_total", (("status", "FAILED"),))] == 0
    assert samples[("chio_sidecar_outcome_latency_seconds_count", ())] == 1


async def test_the_kernel_evaluator_leaves_records_unsigned() -> None:
    outcome = _outcome()
    async with ChioKernelSidecar("http://127.0.0.1:9") as kernel:
        assert await kernel.record_outcome(outcome) is outcome
    assert check_chio_outcome(outcome) == "the outcome record carries no Chio receipt"
