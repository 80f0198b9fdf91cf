"""The step record's headers, built with the constant CloudEvents headers cached per source and
the Chio headers read natively, are byte for byte the contract's builder and the Python parse."""

from __future__ import annotations

import dataclasses
import json

import pytest

import chio_receipts.schemas as schemas
import chio_receipts.streamer as streamer
from tests.support.avro_strategies import sample_step
from tests.support.chio_steps import kernel_receipt_body, with_chio_receipt

pytestmark = pytest.mark.unit


def _reference(receipt: schemas.StepReceipt, source: str) -> tuple[tuple[str, bytes], ...]:
    """The headers as the contract's builder and ``chio_step_fields`` (``json.loads``) make them."""
    out = schemas.cloudevent_headers(
        event_id=receipt.receipt_id,
        event_type=streamer.STEP_TYPE,
        source=source,
        subject=receipt.run_key,
    )
    if receipt.chio_receipt:
        fields = schemas.chio_step_fields(receipt)
        if fields.receipt_id:
            out += ((schemas.X_CHIO_RECEIPT, fields.receipt_id.encode()),)
        if fields.decision:
            out += ((schemas.X_CHIO_VERDICT, fields.decision.encode()),)
    return out


def _with_body(body: dict[str, object]) -> schemas.StepReceipt:
    key = schemas.KeyPair.generate("k1")
    step = with_chio_receipt(sample_step(), key, body=body)
    return schemas.sign_receipt(step, key)[0]


@pytest.mark.parametrize("source", ["urn:test", "urn:é/other"])
def test_step_headers_are_the_reference_bytes(source: str) -> None:
    key = schemas.KeyPair.generate("k1")
    plain, body = schemas.sign_receipt(sample_step(), key)
    for receipt in (plain, _with_body(kernel_receipt_body(sample_step(), parameters={"a": 1}))):
        rec = streamer.step_record(receipt, body, topic="t", source=source)
        assert rec.headers == _reference(receipt, source)
        assert all(isinstance(v, bytes) for _, v in rec.headers)


def test_receipts_the_native_scan_leaves_to_python_get_the_same_headers() -> None:
    # An escaped verdict ("d\\u0065ny", which json.loads reads as "deny") and a receipt
    # without a decision.
    denied = _with_body(
        kernel_receipt_body(sample_step(verdict=schemas.Verdict.DENY), parameters={"a": 1})
    )
    text = denied.chio_receipt.replace('"verdict":"deny"', '"verdict":"d\\u0065ny"')
    assert text != denied.chio_receipt
    assert json.loads(text) == json.loads(denied.chio_receipt)
    escaped = dataclasses.replace(denied, chio_receipt=text)
    carried = {k: v for k, v in json.loads(denied.chio_receipt).items() if k != "decision"}
    undecided = dataclasses.replace(denied, chio_receipt=json.dumps(carried))
    for receipt in (escaped, undecided):
        rec = streamer.step_record(receipt, b"", topic="t", source="s")
        assert rec.headers == _reference(receipt, "s")
    assert (
        dict(streamer.step_record(escaped, b"", topic="t", source="s").headers)[
            schemas.X_CHIO_VERDICT
        ]
        == b"deny"
    )
    assert schemas.X_CHIO_VERDICT not in dict(
        streamer.step_record(undecided, b"", topic="t", source="s").headers
    )
