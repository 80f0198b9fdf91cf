"""check_chio_step: the hot-path check of a step's Chio receipt, against the full verifier."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import pytest

from chio_receipts import schemas
from tests.support.avro_strategies import sample_step
from tests.support.chio_steps import kernel_receipt_body, with_chio_receipt

KEY = schemas.KeyPair.from_seed("k1", bytes(range(32)))
OTHER = schemas.KeyPair.from_seed("k2", bytes(range(1, 33)))
PARAMS = {"args": [{"amount": 12.5, "card": "tok_ü"}], "n": 2**40}


def _step(**overrides: object) -> schemas.StepReceipt:
    return with_chio_receipt(sample_step(**overrides), KEY, parameters=PARAMS)


def test_a_bound_receipt_checks_and_the_full_verifier_agrees() -> None:
    step = _step()
    assert schemas.check_chio_step(step) is None
    assert schemas.check_chio_step(step, trusted_keys={KEY.public_key.hex()}) is None
    receipt = json.loads(step.chio_receipt)
    full = schemas.verify_kernel_receipt(receipt)
    assert full.valid
    assert full.parameter_hash_valid
    assert schemas.chio_verdict(receipt) is schemas.Verdict.ALLOW


def test_a_deny_checks_and_maps_to_deny() -> None:
    step = _step(verdict=schemas.Verdict.DENY, reason="not in scope")
    assert schemas.check_chio_step(step) is None
    assert schemas.chio_step_fields(step).decision == "deny"


def test_a_v1_step_has_nothing_to_check() -> None:
    assert schemas.check_chio_step(sample_step()) is None
    assert schemas.chio_step_fields(sample_step()).receipt_id == ""


def test_an_untrusted_signer_is_named() -> None:
    reason = schemas.check_chio_step(_step(), trusted_keys={OTHER.public_key.hex()})
    assert reason is not None
    assert "not a trusted signer" in reason


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("workflow_id", "another-run"),
        ("run_id", "r-2"),
        ("activity_id", "4"),
        ("attempt", 2),
        ("receipt_id", "01900000-0000-7000-8000-000000000000"),
        ("prev_hash", b"\x01" * 32),
        ("worker_identity", "elsewhere"),
        ("subject", "someone-else"),
        ("scope", ("charge_card", "refund", "wire_money")),
        ("capability_chain", ()),
        ("evaluated_at", 1),
        ("resource", "payments/refund"),
    ],
)
def test_moving_the_receipt_to_another_context_breaks_the_binding(
    field: str, value: object
) -> None:
    moved = dataclasses.replace(_step(), **{field: value})
    reason = schemas.check_chio_step(moved)
    assert reason is not None
    assert "Temporal context" in reason


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [
        ("capability_id", "cap-other", "capability"),
        ("tool", "refund", "tool"),
        ("tool_server", "other", "tool"),
        ("verdict", schemas.Verdict.DENY, "decision"),
    ],
)
def test_a_step_that_disagrees_with_its_receipt_is_refused(
    field: str, value: object, words: str
) -> None:
    step = _step()
    bad = with_chio_receipt(
        dataclasses.replace(step, **{field: value}),
        KEY,
        body=kernel_receipt_body(step, parameters=PARAMS)
        | {
            "metadata": {
                "receipt_context": {
                    "request_id": schemas.request_id_for(
                        dataclasses.replace(step, **{field: value})
                    )
                }
            }
        },
    )
    reason = schemas.check_chio_step(bad)
    assert reason is not None
    assert words in reason


def _tamper_receipt(step: schemas.StepReceipt, **changes: object) -> schemas.StepReceipt:
    receipt = json.loads(step.chio_receipt) | changes
    return dataclasses.replace(step, chio_receipt=json.dumps(receipt))


def test_tampering_with_any_part_is_caught_and_agrees_with_the_full_verifier() -> None:
    step = _step()
    receipt = json.loads(step.chio_receipt)
    cases = {
        "receipt field": _tamper_receipt(step, tool_name="refund"),
        "parameters": _tamper_receipt(
            step, action={**receipt["action"], "parameters": {"args": [1]}}
        ),
        "signature": _tamper_receipt(step, signature="00" * 64),
        "signer": _tamper_receipt(step, kernel_key=OTHER.public_key.hex()),
        "signed bytes": dataclasses.replace(
            step, chio_signed=step.chio_signed.replace(b"payments", b"paymentz")
        ),
        "not json": dataclasses.replace(step, chio_receipt="{"),
        "truncated": dataclasses.replace(step, chio_signed=step.chio_signed[:-1]),
    }
    for what, bad in cases.items():
        assert schemas.check_chio_step(bad) is not None, what
    for what in ("receipt field", "parameters", "signature", "signer"):
        assert not schemas.verify_kernel_receipt(json.loads(cases[what].chio_receipt)), what


def test_a_redacted_receipt_keeps_the_real_hash_and_still_verifies() -> None:
    step = sample_step()
    body = kernel_receipt_body(step, parameters={})
    body["action"] = {"parameters": {}, "parameter_hash": schemas.parameter_hash(PARAMS)}
    body["redaction_mode"] = "redacted"
    signed = with_chio_receipt(step, KEY, body=body)
    assert schemas.check_chio_step(signed) is None
    assert "tok_" not in signed.chio_receipt
    assert b"tok_" not in signed.chio_signed
    assert schemas.chio_step_fields(signed).parameter_hash == schemas.parameter_hash(PARAMS)
    full = schemas.verify_kernel_receipt(json.loads(signed.chio_receipt))
    assert full.valid
    assert not full.parameter_hash_valid


def test_a_deny_whose_reason_was_changed_is_refused() -> None:
    step = _step(verdict=schemas.Verdict.DENY, reason="not in scope")
    reworded = dataclasses.replace(step, reason="allowed after all")
    reason = schemas.check_chio_step(reworded)
    assert reason is not None
    assert "deny reason" in reason


def test_the_request_id_is_a_plain_digest_of_the_bound_fields() -> None:
    step = sample_step(prev_hash=b"\x07" * 32)
    values = [
        step.receipt_id, step.namespace, step.workflow_id, step.run_id, step.workflow_type,
        step.task_queue, step.activity_id, step.activity_type, step.attempt, step.is_local,
        step.action, step.resource, step.subject, list(step.capability_chain), list(step.scope),
        step.argument_digest, step.argument_key_id, step.scheduled_at, step.started_at,
        step.evaluated_at, step.worker_identity, step.prev_hash.hex(),
    ]  # fmt: skip
    text = json.dumps(values, ensure_ascii=True, separators=(",", ":"))
    digest = hashlib.sha256(text.encode()).hexdigest()
    assert schemas.request_id_for(step) == "chio-temporal-v1:" + digest
    # Fields outside the binding do not move it.
    assert schemas.request_id_for(dataclasses.replace(step, latency_us=9, reason="x")) == (
        schemas.request_id_for(step)
    )
