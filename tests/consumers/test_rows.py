"""Typed rows: columns are taken by name, so what ``verify`` compares does not depend on the
select list's order or on columns added to the tables."""

from __future__ import annotations

import random
from dataclasses import fields
from typing import Any

import pytest

from chio_receipts.consumers import (
    ClickHouseConfig,
    ClickHouseSink,
    EnvelopeRow,
    StepRow,
    _clickhouse,
    envelope_row,
    step_row,
    verify_envelope_signature,
    verify_run,
)
from chio_receipts.consumers._builder import ReceiptBuilder, StepEntry
from chio_receipts.consumers._envelope import Envelope
from chio_receipts.consumers._rows import (
    CHIO_COLUMNS,
    ENVELOPE_COLUMNS,
    STEP_COLUMNS,
    STEP_FIELDS,
    envelope_from_row,
    plain_from_row,
    receipt_from_row,
)
from chio_receipts.consumers._wire import decode_plain, envelope_step_body
from chio_receipts.schemas import (
    STEP_SCHEMA,
    ChioStepFields,
    KeyPair,
    Verdict,
    frame,
    raw_schema,
    receipt_hash,
    step_body,
    verify_receipt,
)
from tests.support.consumer_factory import completion, receipt, signed_run

WORKER = KeyPair.generate("worker-rows")
BUILDER = KeyPair.generate("builder-rows")
KEYS = {WORKER.key_id: WORKER.public_key, BUILDER.key_id: BUILDER.public_key}


def _run(workflow_id: str, n: int = 4) -> tuple[list[StepRow], Envelope]:
    """Step rows of a signed run (the last without its stored message, so verify re-encodes
    its columns) and the run's signed envelope."""
    builder = ReceiptBuilder(grace_us=0, evict_after_us=10**9)
    run = builder.open_run(f"default/{workflow_id}/r1", "default", workflow_id, "r1", 0)
    rows = []
    for i, (_, wire) in enumerate(signed_run(WORKER, workflow_id, "r1", n, deny=(1,))):
        plain = decode_plain(wire)
        rec = plain.record
        entry = StepEntry(
            rec["receipt_id"], rec["verdict"], envelope_step_body(plain), receipt_hash(plain.body)
        )
        assert builder.add_step(run, entry, 0)
        rows.append(step_row(rec, b"" if i == n - 1 else wire, 0, i))
    builder.add_completion(run, completion(workflow_id, "r1", expected=n), 0, 0)
    return rows, builder.envelope(run).signed_by(BUILDER)


def _shuffled(names: tuple[str, ...], values: tuple[Any, ...]) -> tuple[list[str], list[Any]]:
    pairs = [*zip(names, values, strict=True), ("ingested_at", 0), ("region", "eu")]
    random.Random(7).shuffle(pairs)
    return [n for n, _ in pairs], [v for _, v in pairs]


@pytest.mark.unit
def test_column_lists_are_the_record_fields() -> None:
    assert tuple(f.name for f in fields(StepRow)) == STEP_COLUMNS
    assert tuple(f.name for f in fields(EnvelopeRow)) == ENVELOPE_COLUMNS
    # The signed receipt's fields lead the step row, in Avro field order.
    assert tuple(f["name"] for f in raw_schema(STEP_SCHEMA)["fields"]) == STEP_FIELDS
    after = STEP_COLUMNS[len(STEP_FIELDS) :]
    assert after[:3] == ("wire", "kafka_partition", "kafka_offset")
    # Then the Chio receipt's analytics columns, each from its schemas.ChioStepFields attribute.
    assert after[3:] == tuple(CHIO_COLUMNS)
    assert set(CHIO_COLUMNS.values()) == set(ChioStepFields.__slots__)


@pytest.mark.unit
def test_rows_are_built_by_column_name_whatever_the_order_or_extra_columns() -> None:
    rows, envelope = _run("wf-names")
    for row in rows:
        names, values = _shuffled(STEP_COLUMNS, row.values())
        assert names != list(STEP_COLUMNS)
        back = StepRow.from_columns(names, values)
        assert back == row
        assert dict(zip(STEP_COLUMNS, back.values(), strict=True)) == dict(
            zip(STEP_COLUMNS, row.values(), strict=True)
        )
        assert verify_receipt(receipt_from_row(back), KEYS)
    env_row = envelope_row(envelope)
    names, values = _shuffled(ENVELOPE_COLUMNS, env_row.values())
    back_env = EnvelopeRow.from_columns(names, values)
    assert back_env == env_row
    rebuilt = envelope_from_row(back_env, envelope.steps)
    assert verify_envelope_signature(rebuilt, BUILDER.public_key)
    # A changed field read by name is still the changed field.
    tampered = dict(zip(names, values, strict=True)) | {"allow_count": env_row.allow_count + 1}
    changed = envelope_from_row(
        EnvelopeRow.from_columns(list(tampered), list(tampered.values())), envelope.steps
    )
    assert not verify_envelope_signature(changed, BUILDER.public_key)


@pytest.mark.unit
def test_a_column_missing_from_the_query_is_an_error_not_a_shift() -> None:
    [row, *_] = _run("wf-missing", 1)[0]
    names = [c for c in STEP_COLUMNS if c != "reason"]
    with pytest.raises(KeyError, match="reason"):
        StepRow.from_columns(names, [getattr(row, c) for c in names])


@pytest.mark.unit
def test_plain_record_of_a_row_is_what_was_signed() -> None:
    rows, _ = _run("wf-plain", 2)
    for row in rows[:-1]:
        assert plain_from_row(row) == decode_plain(row.wire).record


@pytest.mark.integration
async def test_verify_compares_the_same_fields_after_columns_are_added_and_reordered(
    clickhouse_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    rows, envelope = _run("wf-columns")
    async with ClickHouseSink(ClickHouseConfig(dsn=clickhouse_dsn)) as sink:
        await sink.insert_steps(rows, "rows-test-steps")
        await sink.insert_envelopes([envelope_row(envelope)], "rows-test-envelope")

        first = await sink.call(lambda c: verify_run(c, "wf-columns", keys=KEYS))
        assert first.ok, first.problems
        assert (first.steps, first.envelopes) == (len(rows), 1)

        # New columns in the middle of both tables, and both select lists reversed with an
        # extra column: every position a positional reader would use has moved.
        for table in ("step_receipts", "workflow_receipts"):
            await sink.query(
                f"ALTER TABLE {table} ADD COLUMN IF NOT EXISTS region String DEFAULT 'eu' "
                "AFTER run_id"
            )
        for name, columns in (
            ("STEP_SELECT", STEP_COLUMNS),
            ("ENVELOPE_SELECT", ENVELOPE_COLUMNS),
        ):
            reordered = _clickhouse.select_list(["region", *reversed(columns)])
            monkeypatch.setattr(_clickhouse, name, reordered)
        names, _ = await sink.query(f"SELECT {_clickhouse.STEP_SELECT} FROM step_receipts LIMIT 1")
        assert names[0] == "region"
        assert names[1:] == list(reversed(STEP_COLUMNS))

        again = await sink.call(lambda c: verify_run(c, "wf-columns", keys=KEYS))
        assert again.ok, again.problems
        assert (again.steps, again.envelopes) == (first.steps, first.envelopes)

        # A tampered field is still named and caught: one in a row with its stored message,
        # one in the row verified by re-encoding its columns, one in the envelope.
        sync = {"mutations_sync": 2}
        await sink.call(
            lambda c: c.command(
                "ALTER TABLE step_receipts UPDATE reason = 'edited' WHERE receipt_id = {r:String}",
                parameters={"r": rows[0].receipt_id},
                settings=sync,
            )
        )
        await sink.call(
            lambda c: c.command(
                "ALTER TABLE step_receipts UPDATE tool = 'edited' WHERE receipt_id = {r:String}",
                parameters={"r": rows[-1].receipt_id},
                settings=sync,
            )
        )
        await sink.call(
            lambda c: c.command(
                "ALTER TABLE workflow_receipts UPDATE outcome = 'edited' "
                "WHERE workflow_id = 'wf-columns'",
                settings=sync,
            )
        )
        tampered = await sink.call(lambda c: verify_run(c, "wf-columns", keys=KEYS))
    problems = tampered.problems
    assert not tampered.ok
    assert any(
        f"receipt {rows[0].receipt_id}" in p and "field reason changed" in p for p in problems
    ), problems
    assert any(
        f"receipt {rows[-1].receipt_id}" in p and "signature invalid" in p for p in problems
    ), problems
    assert any("builder signature invalid" in p for p in problems), problems


@pytest.mark.integration
async def test_verify_names_an_unsigned_step_row_as_unsigned_not_an_unknown_key(
    clickhouse_dsn: str,
) -> None:
    # A step with neither an Avro signature nor a Chio receipt (a kernel evaluator's deny without
    # a receipt) never becomes a row through the builder (it is dead-lettered as unsigned_step);
    # written some other way, verify reports it as unsigned, with or without its stored message.
    builder = ReceiptBuilder(grace_us=0, evict_after_us=10**9)
    run = builder.open_run("default/wf-unsigned/r1", "default", "wf-unsigned", "r1", 0)
    rows = []
    for i in range(2):
        step = receipt("wf-unsigned", "r1", i, verdict=Verdict.DENY, key_id="", signature=b"")
        wire = frame(STEP_SCHEMA, step_body(step))
        plain = decode_plain(wire)
        rec = plain.record
        entry = StepEntry(
            rec["receipt_id"], rec["verdict"], envelope_step_body(plain), receipt_hash(plain.body)
        )
        assert builder.add_step(run, entry, 0)
        rows.append(step_row(rec, wire if i == 0 else b"", 0, i))
    builder.add_completion(run, completion("wf-unsigned", "r1", expected=2), 0, 0)
    envelope = builder.envelope(run).signed_by(BUILDER)
    async with ClickHouseSink(ClickHouseConfig(dsn=clickhouse_dsn)) as sink:
        await sink.insert_steps(rows, "rows-unsigned-steps")
        await sink.insert_envelopes([envelope_row(envelope)], "rows-unsigned-envelope")
        report = await sink.call(lambda c: verify_run(c, "wf-unsigned", keys=KEYS))
    assert not report.ok
    for row in rows:
        assert any(
            f"receipt {row.receipt_id}" in p and "unsigned step" in p for p in report.problems
        ), report.problems
    assert not any("unknown signing key" in p for p in report.problems), report.problems
