"""Outcome rows and envelope rows with outcome records and attempt accounts (pure): columns are
the record's fields in Avro order, rows are rebuilt by column name, and an envelope rebuilt from
its row, its steps and its outcome records carries the builder's signature."""

from __future__ import annotations

import dataclasses
from dataclasses import fields

import nacl.signing
import pytest

from chio_receipts.consumers._builder import OutcomeEntry, ReceiptBuilder, StepEntry
from chio_receipts.consumers._envelope import verify_envelope_signature
from chio_receipts.consumers._rows import (
    ENVELOPE_COLUMNS,
    OUTCOME_COLUMNS,
    OUTCOME_FIELDS,
    EnvelopeRow,
    OutcomeRow,
    completion_from_row,
    envelope_from_row,
    envelope_row,
    outcome_body,
    outcome_from_row,
    outcome_row,
)
from chio_receipts.consumers._wire import decode_plain
from chio_receipts.schemas import (
    STEP_OUTCOME_SCHEMA,
    AccountState,
    ExpectedAttempt,
    KeyPair,
    StepOutcome,
    StepStatus,
    check_chio_outcome,
    encode,
    raw_schema,
    sign_chio_outcome,
)
from tests.support.consumer_factory import completion, uuid7

pytestmark = pytest.mark.unit
SIGNER = nacl.signing.SigningKey(b"\x09" * 32)
BUILDER = KeyPair.generate("builder-outcome-rows")


def _outcome(attempt: int, status: StepStatus, *, signed: bool = True) -> StepOutcome:
    record = StepOutcome(
        outcome_id=uuid7(),
        namespace="default",
        workflow_id="wf",
        run_id="r1",
        workflow_type="OrderWorkflow",
        task_queue="orders",
        activity_id="1",
        activity_type="charge",
        attempt=attempt,
        is_local=attempt == 3,
        tool_server="agent-tools",
        tool="tool_0",
        capability_id="cap-1",
        decision_receipt_id=uuid7(),
        status=status,
        error_type="IOError" if status is StepStatus.FAILED else "",
        started_at=1_760_000_000_000_000,
        ended_at=1_760_000_000_002_000,
        duration_us=2_000,
        result_digest="ef" * 32,
        result_key_id="hmac-1",
        worker_identity="w@h",
        trace_id="0af7651916cd43dd8448eb211c80319c",
        span_id="b7ad6b7169203331",
    )
    return sign_chio_outcome(record, SIGNER, policy_hash="00" * 32) if signed else record


def test_outcome_columns_are_the_record_fields_then_wire_position_and_analytics() -> None:
    assert tuple(f.name for f in fields(OutcomeRow)) == OUTCOME_COLUMNS
    assert tuple(f["name"] for f in raw_schema(STEP_OUTCOME_SCHEMA)["fields"]) == OUTCOME_FIELDS
    assert OUTCOME_COLUMNS[len(OUTCOME_FIELDS) :] == (
        "wire",
        "kafka_partition",
        "kafka_offset",
        "is_signed",
        "chio_receipt_id",
        "kernel_key",
        "policy_hash",
    )
    assert ENVELOPE_COLUMNS[-2:] == ("outcome_ids", "attempts")


def test_an_outcome_row_round_trips_by_column_name_and_still_checks() -> None:
    signed = _outcome(1, StepStatus.COMPLETED)
    wire = encode(STEP_OUTCOME_SCHEMA, signed.to_avro())
    row = outcome_row(decode_plain(wire).record, wire, 2, 41)
    assert (row.is_signed, row.kernel_key, row.policy_hash) == (
        True,
        bytes(SIGNER.verify_key).hex(),
        "00" * 32,
    )
    assert row.chio_receipt_id
    pairs = [*reversed(list(zip(OUTCOME_COLUMNS, row.values(), strict=True))), ("extra", 1)]
    back = OutcomeRow.from_columns([n for n, _ in pairs], [v for _, v in pairs])
    assert back == row
    rebuilt = outcome_from_row(back)
    assert rebuilt == signed
    assert check_chio_outcome(rebuilt, trusted_keys={row.kernel_key}) is None
    unsigned = _outcome(2, StepStatus.GATE_FAILED, signed=False)
    wire = encode(STEP_OUTCOME_SCHEMA, unsigned.to_avro())
    bare = outcome_row(decode_plain(wire).record, wire, 0, 0)
    assert (bare.is_signed, bare.chio_receipt_id, bare.kernel_key) == (False, "", "")


def test_an_envelope_with_records_and_accounts_is_rebuilt_from_its_row() -> None:
    builder = ReceiptBuilder(grace_us=0, evict_after_us=10**9)
    run = builder.open_run("default/wf/r1", "default", "wf", "r1", 0)
    builder.add_step(run, StepEntry("s1", "ALLOW", b"\x02s1", b"h" * 32, "1", 1), 0)
    bodies = {}
    for attempt, status in ((1, StepStatus.FAILED), (2, StepStatus.GATE_FAILED)):
        record = _outcome(attempt, status, signed=attempt == 1)
        plain = decode_plain(encode(STEP_OUTCOME_SCHEMA, record.to_avro()))
        body = outcome_body(plain)
        bodies[record.outcome_id] = body
        entry = OutcomeEntry(
            record.outcome_id, "1", attempt, status, record.error_type, attempt == 1, body
        )
        builder.add_outcome(run, entry, 0)
    expected = tuple(
        ExpectedAttempt(
            activity_id="1", activity_type="charge", attempt=n, is_local=n == 3, temporal_end=end
        )
        for n, end in ((1, "failed:IOError"), (2, "failed:GateError"), (3, "timed_out:x"))
    )
    done = dataclasses.replace(completion("wf", "r1", expected=None), expected_attempts=expected)
    builder.add_completion(run, done, 0, 0)
    envelope = builder.envelope(run).signed_by(BUILDER)
    assert [a.account for a in envelope.attempts] == [
        AccountState.RECEIPTED,
        AccountState.GATE_FAILED,
        AccountState.WORKER_LOST,
    ]
    row = envelope_row(envelope)
    # ClickHouse reads the named tuples back as dicts.
    values = dict(zip(ENVELOPE_COLUMNS, row.values(), strict=True))
    values["attempts"] = [
        dict(zip(("activity_id", "activity_type", "attempt", "is_local"), a[:4], strict=True))
        | {"account": a[4], "reason": a[5], "outcome": a[6]}
        for a in values["attempts"]
    ]
    back = EnvelopeRow.from_columns(list(values), list(values.values()))
    assert back == row
    rebuilt = envelope_from_row(back, envelope.steps, [bodies[o] for o in back.outcome_ids])
    assert verify_envelope_signature(rebuilt, BUILDER.public_key)
    # The records and the accounts are signed: another order or account does not verify.
    swapped = envelope_from_row(back, envelope.steps, [bodies[o] for o in back.outcome_ids][::-1])
    assert not verify_envelope_signature(swapped, BUILDER.public_key)
    lost = dataclasses.replace(
        back,
        attempts=(
            *back.attempts[:2],
            dataclasses.replace(back.attempts[2], account=AccountState.MISSING),
        ),
    )
    changed = envelope_from_row(lost, envelope.steps, [bodies[o] for o in back.outcome_ids])
    assert not verify_envelope_signature(changed, BUILDER.public_key)
    # What the row keeps of Temporal's attempts gives the same accounts again.
    assert completion_from_row(back).expected_attempts == (
        dataclasses.replace(expected[0], temporal_end=""),
        dataclasses.replace(expected[1], temporal_end=""),
        expected[2],
    )
