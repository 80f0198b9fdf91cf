"""A record read by schema resolution (registry or older writer) has the same plain form as
one read on the current-schema fast path."""

from __future__ import annotations

import uuid

import pytest

import chio_receipts.schemas as schemas
from chio_receipts.consumers._wire import ENVELOPE_SCHEMA, _normalize, decode_plain
from tests.support.avro_strategies import sample_envelope, sample_step

pytestmark = pytest.mark.unit


def test_an_envelope_read_with_logical_types_normalizes_to_the_plain_form() -> None:
    key = schemas.KeyPair.generate("k")
    step, _ = schemas.sign_receipt(sample_step(receipt_id=str(uuid.uuid4())), key)
    value = schemas.encode(ENVELOPE_SCHEMA, sample_envelope(step, started_at=1_763_000_000_123_456))
    fast = decode_plain(value)
    assert fast.current
    resolved = schemas.decode(value)  # logical types converted: datetimes, UUIDs
    assert not isinstance(resolved.record["started_at"], int)
    plain = _normalize(resolved)
    assert plain == fast.record
    assert plain["started_at"] == 1_763_000_000_123_456
    assert isinstance(plain["steps"][0]["receipt_id"], str)
