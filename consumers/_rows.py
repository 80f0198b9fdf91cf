"""ClickHouse rows: step receipts and envelopes as column tuples, and back (pure).

Step rows carry every field of the signed receipt in Avro field order (what analysts query) and,
in ``wire``, the framed message exactly as consumed (zstd-compressed). A verifier checks the
signature over ``wire`` and compares every column with it, so it can say which field of a row was
changed; a row whose ``wire`` is empty is verified by re-encoding its columns.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from chio_receipts.consumers._envelope import Envelope
from chio_receipts.schemas import CompletionSource, Outcome, RunCompletion, StepReceipt, Verdict

__all__ = [
    "ENVELOPE_COLUMNS",
    "STEP_COLUMNS",
    "STEP_FIELDS",
    "completion_from_row",
    "envelope_from_row",
    "envelope_row",
    "plain_from_row",
    "receipt_from_row",
    "step_row",
]

# Avro field order of StepReceipt: the first 30 columns of step_receipts.
STEP_FIELDS: tuple[str, ...] = (
    "receipt_id",
    "namespace",
    "workflow_id",
    "run_id",
    "workflow_type",
    "task_queue",
    "activity_id",
    "activity_type",
    "attempt",
    "is_local",
    "tool_server",
    "tool",
    "action",
    "resource",
    "subject",
    "capability_id",
    "capability_chain",
    "scope",
    "verdict",
    "reason",
    "argument_digest",
    "argument_key_id",
    "scheduled_at",
    "started_at",
    "evaluated_at",
    "latency_us",
    "worker_identity",
    "prev_hash",
    "key_id",
    "signature",
)
STEP_COLUMNS: tuple[str, ...] = (*STEP_FIELDS, "wire", "kafka_partition", "kafka_offset")

ENVELOPE_COLUMNS: tuple[str, ...] = (
    "namespace",
    "workflow_id",
    "run_id",
    "workflow_type",
    "parent_workflow_ids",
    "started_at",
    "completed_at",
    "outcome",
    "step_count",
    "allow_count",
    "deny_count",
    "revision",
    "complete",
    "missing_steps",
    "expected_steps",
    "receipt_ids",
    "chain_root",
    "key_id",
    "signature",
    "extra",
)


def step_row(record: dict[str, Any], wire: bytes, partition: int, offset: int) -> tuple[Any, ...]:
    """The step_receipts row of a plain decoded step record (dict in Avro field order)."""
    return (*record.values(), wire, partition, offset)


def receipt_from_row(row: Sequence[Any]) -> StepReceipt:
    """Rebuild the signed receipt from the first 30 columns of a step row.

    Expects ids as str, timestamps as int microseconds and bytes columns as bytes (the queries
    of this package select them that way)."""
    d = dict(zip(STEP_FIELDS, row, strict=False))
    return StepReceipt(
        receipt_id=str(d["receipt_id"]),
        namespace=d["namespace"],
        workflow_id=d["workflow_id"],
        run_id=d["run_id"],
        workflow_type=d["workflow_type"],
        task_queue=d["task_queue"],
        activity_id=d["activity_id"],
        activity_type=d["activity_type"],
        attempt=int(d["attempt"]),
        is_local=bool(d["is_local"]),
        tool_server=d["tool_server"],
        tool=d["tool"],
        action=d["action"],
        resource=d["resource"],
        subject=d["subject"],
        capability_id=d["capability_id"],
        capability_chain=tuple(d["capability_chain"]),
        scope=tuple(d["scope"]),
        verdict=Verdict(d["verdict"]),
        reason=d["reason"],
        argument_digest=d["argument_digest"],
        argument_key_id=d["argument_key_id"],
        scheduled_at=int(d["scheduled_at"]),
        started_at=int(d["started_at"]),
        evaluated_at=int(d["evaluated_at"]),
        latency_us=int(d["latency_us"]),
        worker_identity=d["worker_identity"],
        prev_hash=bytes(d["prev_hash"]),
        key_id=d["key_id"],
        signature=bytes(d["signature"]),
    )


def envelope_row(envelope: Envelope) -> tuple[Any, ...]:
    """The workflow_receipts row of an envelope (its revision is the replacing version)."""
    return (
        envelope.namespace,
        envelope.workflow_id,
        envelope.run_id,
        envelope.workflow_type,
        list(envelope.parent_workflow_ids),
        envelope.started_at,
        envelope.completed_at,
        envelope.outcome,
        envelope.step_count,
        envelope.allow_count,
        envelope.deny_count,
        envelope.revision,
        envelope.complete,
        envelope.missing_steps,
        envelope.expected_steps,
        list(envelope.receipt_ids),
        envelope.chain_root,
        envelope.key_id,
        envelope.signature,
        dict(envelope.extra),
    )


def envelope_from_row(row: Sequence[Any], steps: Sequence[bytes]) -> Envelope:
    """Rebuild an envelope from its row (ENVELOPE_COLUMNS order) and its steps' bodies."""
    d = dict(zip(ENVELOPE_COLUMNS, row, strict=True))
    return Envelope(
        namespace=d["namespace"],
        workflow_id=d["workflow_id"],
        run_id=d["run_id"],
        workflow_type=d["workflow_type"],
        parent_workflow_ids=tuple(d["parent_workflow_ids"]),
        started_at=int(d["started_at"]),
        completed_at=None if d["completed_at"] is None else int(d["completed_at"]),
        outcome=d["outcome"],
        revision=int(d["revision"]),
        complete=bool(d["complete"]),
        missing_steps=int(d["missing_steps"]),
        expected_steps=None if d["expected_steps"] is None else int(d["expected_steps"]),
        allow_count=int(d["allow_count"]),
        deny_count=int(d["deny_count"]),
        receipt_ids=tuple(str(r) for r in d["receipt_ids"]),
        steps=tuple(steps),
        chain_root=bytes(d["chain_root"]),
        extra=tuple(sorted(dict(d["extra"]).items())),
        key_id=d["key_id"],
        signature=bytes(d["signature"]),
    )


def completion_from_row(row: Sequence[Any]) -> RunCompletion:
    """The completion facts an envelope row was built from (to revise it later)."""
    d = dict(zip(ENVELOPE_COLUMNS, row, strict=True))
    extra = dict(d["extra"])
    outcome = str(d["outcome"]).upper()
    return RunCompletion(
        event_id="",
        namespace=d["namespace"],
        workflow_id=d["workflow_id"],
        run_id=d["run_id"],
        workflow_type=d["workflow_type"],
        task_queue="",
        outcome=Outcome(outcome) if outcome in Outcome.__members__ else Outcome.UNKNOWN,
        started_at=int(d["started_at"]),
        closed_at=0 if d["completed_at"] is None else int(d["completed_at"]),
        parent_workflow_ids=tuple(d["parent_workflow_ids"]),
        parent_run_id=extra.get("parent_run_id"),
        continued_from_run_id=extra.get("continued_from_run_id"),
        continued_as_new_run_id=extra.get("continued_as_new_run_id"),
        expected_steps=None if d["expected_steps"] is None else int(d["expected_steps"]),
        source=CompletionSource.UNKNOWN,
    )


def plain_from_row(row: Sequence[Any]) -> dict[str, Any]:
    """The plain Avro record (ids as str, timestamps as int µs) of a step row's first 30
    columns, bytes columns given as bytes."""
    rec = dict(zip(STEP_FIELDS, row, strict=False))
    rec["receipt_id"] = str(rec["receipt_id"])
    rec["capability_chain"] = list(rec["capability_chain"])
    rec["scope"] = list(rec["scope"])
    for name in ("attempt", "scheduled_at", "started_at", "evaluated_at", "latency_us"):
        rec[name] = int(rec[name])
    rec["is_local"] = bool(rec["is_local"])
    rec["verdict"] = str(rec["verdict"])
    rec["prev_hash"] = bytes(rec["prev_hash"])
    rec["signature"] = bytes(rec["signature"])
    return rec
