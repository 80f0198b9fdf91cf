"""Rows, OCSF mapping, dead-letter records, decoding, keys and failpoints (pure)."""

from __future__ import annotations

import base64
import importlib
import os
import types

import pytest

from chio_receipts.consumers import (
    DeadLetter,
    FailpointError,
    KeyResolutionError,
    Reason,
    decode_public_key,
    parse_dead_letter_headers,
    receipt_from_row,
    step_row,
)
from chio_receipts.consumers._failpoints import failpoint, reset_failpoints
from chio_receipts.consumers._rows import STEP_COLUMNS, plain_from_row
from chio_receipts.consumers._wire import RUN_SCHEMA, STEP_SCHEMA, decode_plain, encode_plain
from chio_receipts.consumers.siem import envelope_to_ocsf, is_deny, step_to_ocsf
from chio_receipts.schemas import (
    CE_HEADERS,
    DEAD_LETTER_EVENT_TYPE,
    STEP_EVENT_TYPE,
    KeyPair,
    MalformedBody,
    UnknownFormat,
    UnknownSchema,
    cloudevent_headers,
    verify_receipt,
)
from tests.support.consumer_factory import completion, completion_value, signed_run

pytestmark = pytest.mark.unit
KEY = KeyPair.generate("worker-1")


def test_step_row_round_trips_to_a_verifiable_receipt() -> None:
    [(signed, wire)] = signed_run(KEY, "wf-1", "run-1", 1)
    plain = decode_plain(wire)
    assert plain.current
    assert plain.schema_name == STEP_SCHEMA
    assert isinstance(plain.record["receipt_id"], str)
    assert isinstance(plain.record["evaluated_at"], int)
    row = step_row(plain.record, wire, 3, 42)
    assert len(row.values()) == len(STEP_COLUMNS)
    assert (row.wire, row.kafka_partition, row.kafka_offset) == (wire, 3, 42)
    back = receipt_from_row(row)
    assert back == signed
    assert verify_receipt(back, {"worker-1": KEY.public_key})
    assert encode_plain(STEP_SCHEMA, plain_from_row(row)) == plain.body


def test_completion_decodes_plain() -> None:
    event = completion("wf", "run", expected=4)
    plain = decode_plain(completion_value(event))
    assert plain.schema_name == RUN_SCHEMA
    assert plain.record["expected_steps"] == 4


@pytest.mark.parametrize(
    ("value", "error"),
    [
        (os.urandom(64).replace(b"\xc3", b"\x00"), UnknownFormat),
        (b"\xc3\x01" + b"\x00" * 8 + b"abc", UnknownSchema),
        (b"", UnknownFormat),
    ],
)
def test_poison_bytes_raise_typed_errors(value: bytes, error: type[Exception]) -> None:
    with pytest.raises(error):
        decode_plain(value)


def test_truncated_avro_is_malformed() -> None:
    [(_, wire)] = signed_run(KEY, "wf", "run", 1)
    with pytest.raises(MalformedBody):
        decode_plain(wire[: len(wire) // 2])


def test_ocsf_step_mapping() -> None:
    [(_, allow_wire), (_, deny_wire)] = signed_run(KEY, "wf-9", "run-9", 2, deny=(1,))
    allow = step_to_ocsf(decode_plain(allow_wire).record)
    deny_rec = decode_plain(deny_wire).record
    deny = step_to_ocsf(deny_rec)
    assert (allow["class_uid"], allow["category_uid"], allow["type_uid"]) == (6003, 6, 600399)
    assert (allow["action"], allow["action_id"]) == ("Allowed", 1)
    assert (deny["action"], deny["action_id"]) == ("Denied", 2)
    assert is_deny(deny)
    assert not is_deny(allow)
    assert deny["metadata"]["uid"] == deny_rec["receipt_id"]
    assert deny["time"] == deny_rec["evaluated_at"] // 1000
    assert deny["actor"]["user"]["name"] == "agent:test"
    assert deny["api"]["operation"] == deny_rec["activity_type"]
    assert deny["api"]["service"]["name"] == "agent-tools"
    assert deny["resources"][0]["name"] == deny_rec["tool"]
    assert "argument" not in str(deny["unmapped"].keys() - {"argument_digest"})


def test_ocsf_envelope_mapping() -> None:
    record = {
        "workflow_id": "wf",
        "run_id": "r",
        "started_at": 1_000_000,
        "completed_at": 2_000_000,
        "outcome": "failure",
        "step_count": 2,
        "allow_count": 1,
        "deny_count": 1,
        "metadata": {"revision": "2", "workflow_type": "T", "complete": "true"},
    }
    event = envelope_to_ocsf(record)
    assert event["class_uid"] == 6003
    assert event["metadata"]["uid"] == "wf/r/2"
    assert event["action"] == "Denied"
    assert event["time"] == 2000


def test_dead_letter_headers_keep_origin_and_original_headers() -> None:
    letter = DeadLetter.of(
        topic="steps",
        partition=2,
        offset=17,
        key=b"k",
        value=b"\x00bad",
        headers=[("trace", b"abc")],
        error=UnknownFormat("not avro"),
        reason=Reason.UNKNOWN_FORMAT,
    )
    headers = letter.kafka_headers()
    assert headers[0] == ("trace", b"abc")
    parsed = parse_dead_letter_headers(headers)
    assert parsed == {
        "topic": "steps",
        "partition": "2",
        "offset": "17",
        "error_class": "UnknownFormat",
        "reason": "unknown_format",
        "detail": "not avro",
    }
    assert letter.value == b"\x00bad"
    headers_of = dict(headers)
    assert headers_of["ce_specversion"] == b"1.0"
    assert headers_of["ce_type"] == DEAD_LETTER_EVENT_TYPE.encode()
    assert headers_of["ce_id"] == b"steps/2/17"
    assert headers_of["ce_source"] == b"urn:chio-receipts:consumer"
    assert headers_of["ce_subject"] == b"k"
    assert headers_of["content-type"] == b"application/octet-stream"


def test_dead_letter_replaces_the_originals_cloudevents_headers_and_keeps_them_aside() -> None:
    original = cloudevent_headers(
        event_id="r-1", event_type=STEP_EVENT_TYPE, source="urn:w", subject="ns/wf/run"
    )
    letter = DeadLetter.of(
        topic="steps",
        partition=0,
        offset=3,
        key=b"ns/wf/run",
        value=b"\xc3\x01",
        headers=[("trace", b"t"), *original],
        error="BadSignature",
        reason=Reason.BAD_SIGNATURE,
    )
    headers = letter.kafka_headers(source="urn:chio-receipts:receipt-builder")
    names = [k for k, _ in headers]
    for name in CE_HEADERS:
        assert names.count(name) == 1, name  # one value per CloudEvents attribute
    got = dict(headers)
    assert got["ce_type"] == DEAD_LETTER_EVENT_TYPE.encode()
    assert got["ce_id"] == b"steps/0/3"
    assert got["ce_source"] == b"urn:chio-receipts:receipt-builder"
    assert got["ce_subject"] == b"ns/wf/run"
    assert got["content-type"] == b"application/avro"  # the original's: the value is its bytes
    assert got["trace"] == b"t"
    parsed = parse_dead_letter_headers(headers)
    assert parsed["original.ce_id"] == "r-1"
    assert parsed["original.ce_type"] == STEP_EVENT_TYPE
    assert parsed["reason"] == "bad_signature"


def test_public_keys_in_hex_and_base64() -> None:
    raw = KEY.public_key
    assert decode_public_key(raw.hex()) == raw
    assert decode_public_key(base64.b64encode(raw).decode()) == raw
    assert decode_public_key(base64.urlsafe_b64encode(raw).decode().rstrip("=")) == raw
    with pytest.raises(KeyResolutionError):
        decode_public_key("not a key")


def test_failpoints_fire_on_the_configured_hit() -> None:
    reset_failpoints("unit.point@2=raise")
    try:
        failpoint("unit.point")
        failpoint("other.point")
        with pytest.raises(FailpointError):
            failpoint("unit.point")
        failpoint("unit.point")  # fires once
    finally:
        reset_failpoints("")


@pytest.mark.parametrize("name", ["chio_receipts.consumers", "chio_receipts.consumers.siem"])
def test_public_api_is_exactly_all(name: str) -> None:
    package = importlib.import_module(name)
    public = {
        n
        for n, v in vars(package).items()
        if not n.startswith("_") and not isinstance(v, types.ModuleType)  # subpackages
    } - {"annotations"}
    assert set(package.__all__) == public
    assert all(
        getattr(package, n).__doc__ for n in package.__all__ if callable(getattr(package, n))
    )
