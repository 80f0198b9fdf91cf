"""The direct StepReceipt writer gives fastavro's bytes, and declines what it does not handle."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings

import chio_receipts.schemas as schemas
from chio_receipts.schemas._avro import encode_body
from chio_receipts.schemas._stepcodec import encode_step
from tests.support.avro_strategies import normalize, sample_step, strategy

STEP = schemas.STEP_SCHEMA


def _fastavro(receipt: schemas.StepReceipt) -> bytes:
    return encode_body(STEP, receipt.to_avro())


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(strategy(schemas.raw_schema(STEP)))
def test_same_bytes_as_fastavro_for_any_receipt(record: dict[str, Any]) -> None:
    receipt = schemas.StepReceipt.from_avro(normalize(record))
    direct = encode_step(receipt, receipt.key_id, receipt.signature)
    assert direct is not None
    assert direct == _fastavro(receipt)
    assert schemas.step_body(receipt) == direct
    assert schemas.StepReceipt.from_avro(schemas.decode(schemas.frame(STEP, direct)).record) == (
        receipt
    )


def test_signing_uses_the_same_bytes_and_verifies() -> None:
    key = schemas.KeyPair.generate("k1")
    signed, body = schemas.sign_receipt(sample_step(reason="ünïcode ✓", attempt=2**31 - 1), key)
    assert body == _fastavro(signed)
    assert schemas.verify_body(body, key.public_key)


@pytest.mark.parametrize(
    "overrides",
    [
        {"attempt": True},  # a bool is not an Avro int here: fastavro decides
        {"attempt": 2**31},  # out of int32: fastavro raises
        {"verdict": "ALLOW"},  # a plain str, not the enum
        {"scope": frozenset({"a"})},
        {"latency_us": 1.5},
        {"prev_hash": bytearray(b"x")},
        {"reason": "lone \ud800 surrogate"},
    ],
)
def test_values_of_other_types_are_left_to_fastavro(overrides: dict[str, Any]) -> None:
    receipt = sample_step(**overrides)
    assert encode_step(receipt, "k", b"") is None


def test_the_writer_follows_the_schema_field_order() -> None:
    fields = [f["name"] for f in json.loads(json.dumps(schemas.raw_schema(STEP)))["fields"]]
    receipt = sample_step(prev_hash=b"\x01" * 32)
    # Every field distinct, so a swapped pair would change the bytes.
    assert encode_step(receipt, "key-1", b"\x02" * 64) == _fastavro(
        receipt.with_signature(key_id="key-1", signature=b"\x02" * 64)
    )
    assert fields[-2:] == ["key_id", "signature"]


def test_varints_match_the_plain_loop_over_the_whole_long_range() -> None:
    import random

    rng = random.Random(7)
    edges = [0, 1, 63, 64, -1, -64, -65, 2**27, 2**28, 2**31, -(2**31), 2**63 - 1, -(2**63)]
    values = edges + [rng.randint(-(2**63), 2**63 - 1) for _ in range(20_000)]
    values += [1_763_000_000_000_000 + rng.randint(0, 10**9) for _ in range(20_000)]
    for n in values:
        assert schemas.avro_long(n) == _plain_varint(n), n


def _plain_varint(n: int) -> bytes:
    """The textbook zig-zag varint, one 7-bit group per loop."""
    z = (n << 1) ^ (n >> 63)
    out = bytearray()
    while z > 0x7F:
        out.append((z & 0x7F) | 0x80)
        z >>= 7
    out.append(z)
    return bytes(out)


def test_sign_receipt_returns_a_signed_copy_and_leaves_the_receipt_unsigned() -> None:
    key = schemas.KeyPair.generate("k1")
    unsigned = sample_step(reason="fresh")
    signed, body = schemas.sign_receipt(unsigned, key)
    assert (unsigned.key_id, unsigned.signature) == ("", b"")
    assert signed == schemas.StepReceipt.from_avro(schemas.decode(schemas.frame(STEP, body)).record)
    assert signed.key_id == "k1"
    assert schemas.step_body(signed) == body
    assert schemas.verify_body(body, key.public_key)
    assert schemas.verify_receipt(signed, {"k1": key.public_key})


def test_lists_encode_like_tuples_and_a_refused_value_leaves_no_trace() -> None:
    first = sample_step(scope=("a", "b"), workflow_id="wf-1")
    expected = _fastavro(first.with_signature(key_id="k", signature=b""))
    assert encode_step(first, "k", b"") == expected
    as_list = sample_step(scope=["a", "b"], workflow_id="wf-1", receipt_id=first.receipt_id)
    assert encode_step(as_list, "k", b"") == expected
    assert encode_step(sample_step(workflow_id="wf-1", task_queue=7), "k", b"") is None
    assert encode_step(first, "k", b"") == expected
