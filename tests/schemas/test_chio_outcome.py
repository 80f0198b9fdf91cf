"""Outcome records signed as Chio trace_observation receipts, checked as the consumers do."""

from __future__ import annotations

import dataclasses
import json

import nacl.signing
import pytest

import chio_receipts.schemas as schemas

pytestmark = pytest.mark.unit

KEY = nacl.signing.SigningKey(bytes(range(32)))
KEY_HEX = KEY.verify_key.encode().hex()
POLICY = "11" * 32


def _outcome(**overrides: object) -> schemas.StepOutcome:
    fields: dict[str, object] = {
        "outcome_id": "0190c0de-0000-7000-8000-000000000001",
        "namespace": "default",
        "workflow_id": "order-42",
        "run_id": "run-1",
        "workflow_type": "OrderWorkflow",
        "task_queue": "orders",
        "activity_id": "3",
        "activity_type": "charge_card",
        "attempt": 2,
        "is_local": False,
        "tool_server": "payments",
        "tool": "charge_card",
        "capability_id": "cap-1",
        "decision_receipt_id": "0190c0de-0000-7000-8000-0000000000aa",
        "decision_chio_id": "ab" * 32,
        "status": schemas.StepStatus.FAILED,
        "error_type": "CardDeclined",
        "started_at": 1_763_000_000_000_000,
        "ended_at": 1_763_000_000_250_000,
        "duration_us": 250_000,
        "result_digest": "",
        "result_key_id": "hmac-1",
        "worker_identity": "worker-1@host",
        "trace_id": "0af7651916cd43dd8448eb211c80319c",
        "span_id": "b7ad6b7169203331",
    }
    fields.update(overrides)
    return schemas.StepOutcome(**fields)  # type: ignore[arg-type]


def test_a_signed_outcome_is_a_kernel_valid_trace_observation_bound_to_its_fields() -> None:
    signed = schemas.sign_chio_outcome(_outcome(), KEY, policy_hash=POLICY)
    receipt = json.loads(signed.chio_receipt)
    assert schemas.verify_kernel_receipt(receipt, trusted_keys={KEY_HEX}).valid
    assert receipt["receipt_kind"] == "trace_observation"
    assert "decision" not in receipt
    assert receipt["content_hash"] == schemas.content_hash(None)  # no output recorded
    meta = receipt["metadata"][schemas.OUTCOME_METADATA_KEY]
    assert meta["status"] == "FAILED"
    assert meta["decision_chio_id"] == "ab" * 32
    assert receipt["metadata"]["receipt_context"]["request_id"] == schemas.outcome_request_id(
        signed
    )
    assert schemas.check_chio_outcome(signed, trusted_keys={KEY_HEX}) is None


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("status", schemas.StepStatus.COMPLETED),
        ("duration_us", 1),
        ("attempt", 3),
        ("decision_receipt_id", "other"),
        ("result_digest", "cd" * 32),
        ("run_id", "run-2"),
        ("trace_id", ""),
    ],
)
def test_changing_any_field_breaks_the_binding(field: str, value: object) -> None:
    signed = schemas.sign_chio_outcome(_outcome(), KEY, policy_hash=POLICY)
    moved = dataclasses.replace(signed, **{field: value})
    assert (
        schemas.check_chio_outcome(moved) == "the Chio receipt is not bound to this outcome record"
    )


def test_untrusted_unsigned_and_decision_receipts_are_refused() -> None:
    signed = schemas.sign_chio_outcome(_outcome(), KEY, policy_hash=POLICY)
    assert "not a trusted signer" in str(schemas.check_chio_outcome(signed, trusted_keys=set()))
    assert schemas.check_chio_outcome(_outcome()) == "the outcome record carries no Chio receipt"
    tampered = dataclasses.replace(
        signed, chio_signed=signed.chio_signed.replace(b"250000", b"250001")
    )
    assert schemas.check_chio_outcome(tampered) is not None


def test_outcome_records_round_trip_through_the_codec() -> None:
    signed = schemas.sign_chio_outcome(_outcome(), KEY, policy_hash=POLICY)
    framed = schemas.encode(schemas.STEP_OUTCOME_SCHEMA, signed.to_avro())
    decoded = schemas.decode(framed)
    assert decoded.schema_name == schemas.STEP_OUTCOME_SCHEMA
    assert schemas.StepOutcome.from_avro(decoded.record) == signed
