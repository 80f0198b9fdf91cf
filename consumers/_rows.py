"""ClickHouse rows: step receipts and envelopes as typed records, and back (pure).

:class:`StepRow` and :class:`EnvelopeRow` are the column lists of ``step_receipts`` and
``workflow_receipts``: their fields, in order, are the columns this package writes
(``STEP_COLUMNS``, ``ENVELOPE_COLUMNS`` derive from them), and rows read back are built from a
query's column *names* (:meth:`StepRow.from_columns`), never from positions, so adding or
reordering a selected column cannot change what a signature check compares.

Step rows carry every field of the signed receipt in Avro field order (what analysts query) and,
in ``wire``, the framed message exactly as consumed (zstd-compressed). A verifier checks the
signature over ``wire`` and compares every column with it, so it can say which field of a row was
changed; a row whose ``wire`` is empty is verified by re-encoding its columns.

Since StepReceipt v2 a step row also keeps the step's Chio kernel receipt: ``chio_receipt`` (its
JSON exactly as signed) and ``chio_signed`` (the signed bytes ``JCS({"body", "id"})``, stored as
a binary ``String``), which are all ``schemas.check_chio_step`` needs, and after the Kafka
position the receipt's analytics columns (``CHIO_COLUMNS``, from ``schemas.chio_step_fields``).
Rows of v1 steps have them all empty.

:class:`OutcomeRow` is a ``step_outcomes`` row: every field of the ``StepOutcome`` record in Avro
order, ``wire`` and the Kafka position as for steps, then analytics columns (``is_signed`` and
the outcome receipt's id, signer and policy). Envelope rows also keep what a verifier needs to
rebuild the signed envelope: ``outcome_ids`` in envelope order and the ``attempts`` accounts.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from operator import attrgetter, itemgetter
from typing import Any, Self

import chio_receipts_native

from chio_receipts.consumers._envelope import Envelope, RunHeader
from chio_receipts.consumers._wire import STEP_OUTCOME_SCHEMA, Plain, encode_plain
from chio_receipts.schemas import (
    AccountState,
    AttemptAccount,
    ChioStepFields,
    CompletionSource,
    ExpectedAttempt,
    Outcome,
    RunCompletion,
    StepOutcome,
    StepReceipt,
    Verdict,
)

__all__ = [
    "CHIO_COLUMNS",
    "ENVELOPE_COLUMNS",
    "OUTCOME_COLUMNS",
    "OUTCOME_FIELDS",
    "STEP_COLUMNS",
    "STEP_FIELDS",
    "EnvelopeRow",
    "OutcomeRow",
    "StepRow",
    "chio_columns",
    "chio_columns_batch",
    "completion_from_row",
    "envelope_from_row",
    "envelope_row",
    "expected_from_accounts",
    "outcome_body",
    "outcome_columns",
    "outcome_from_row",
    "outcome_plain_from_row",
    "outcome_row",
    "plain_from_row",
    "receipt_from_row",
    "step_row",
]


def _opt_int(value: Any) -> int | None:
    return None if value is None else int(value)


def _strs(value: Any) -> tuple[str, ...]:
    return tuple(str(v) for v in value)


def _pairs(value: Any) -> tuple[tuple[str, str], ...]:
    items = value.items() if isinstance(value, Mapping) else value
    return tuple(sorted((str(k), str(v)) for k, v in items))


def _account(value: Any) -> AttemptAccount:
    """An attempt account read back (a named tuple reads as a dict) or as inserted (a tuple)."""
    if not isinstance(value, Mapping):
        value = dict(zip(_ACCOUNT_FIELDS, value, strict=True))
    return AttemptAccount.from_avro(
        {**value, "attempt": int(value["attempt"]), "is_local": bool(value["is_local"])}
    )


def _accounts(value: Any) -> tuple[AttemptAccount, ...]:
    return tuple(_account(v) for v in value)


_ACCOUNT_FIELDS: tuple[str, ...] = (
    *("activity_id", "activity_type", "attempt", "is_local", "account", "reason", "outcome"),
)

# How a value read back (or decoded from Avro) becomes the field's type, by field type.
_CONVERT: dict[str, Callable[[Any], Any]] = {
    "str": str,
    "int": int,
    "bool": bool,
    "bytes": bytes,
    "int | None": _opt_int,
    "tuple[str, ...]": _strs,
    "tuple[tuple[str, str], ...]": _pairs,
    "tuple[AttemptAccount, ...]": _accounts,
}


def _from_columns(
    cls: type[Any], columns: tuple[str, ...], names: Sequence[str], values: Sequence[Any]
) -> Any:
    got = dict(zip(names, values, strict=True))
    missing = [c for c in columns if c not in got]
    if missing:
        raise KeyError(f"{cls.__name__}: the query did not select {', '.join(missing)}")
    converters = _CONVERTERS[cls]
    return cls(**{c: converters[c](got[c]) for c in columns})


@dataclass(frozen=True, slots=True, kw_only=True)
class StepRow:
    """One ``step_receipts`` row; the field order is the insert column order, and the first
    fields (through ``signature``) are the signed receipt's Avro fields in Avro order."""

    receipt_id: str
    namespace: str
    workflow_id: str
    run_id: str
    workflow_type: str
    task_queue: str
    activity_id: str
    activity_type: str
    attempt: int
    is_local: bool
    tool_server: str
    tool: str
    action: str
    resource: str
    subject: str
    capability_id: str
    capability_chain: tuple[str, ...]
    scope: tuple[str, ...]
    verdict: str
    reason: str
    argument_digest: str
    argument_key_id: str
    scheduled_at: int
    started_at: int
    evaluated_at: int
    latency_us: int
    worker_identity: str
    prev_hash: bytes
    chio_receipt: str = ""
    chio_signed: bytes = b""
    trace_id: str = ""
    span_id: str = ""
    key_id: str
    signature: bytes
    wire: bytes
    kafka_partition: int
    kafka_offset: int
    # The analytics columns of the Chio receipt (schemas.chio_step_fields), empty for a v1 step.
    chio_receipt_id: str = ""
    receipt_kind: str = ""
    boundary_class: str = ""
    trust_level: str = ""
    tool_origin: str = ""
    redaction_mode: str = ""
    policy_hash: str = ""
    content_hash: str = ""
    kernel_key: str = ""
    decision: str = ""
    guard: str = ""
    parameter_hash: str = ""

    @classmethod
    def from_columns(cls, names: Sequence[str], values: Sequence[Any]) -> Self:
        """The row of a query result row ``values`` whose column names are ``names``.

        Columns are taken by name (extra columns are ignored, a missing one is a KeyError).
        Expects ids as str, timestamps as int microseconds and bytes columns as bytes (the
        queries of this package select them that way)."""
        row: Self = _from_columns(cls, STEP_COLUMNS, names, values)
        return row

    def values(self) -> tuple[Any, ...]:
        """The row's values in ``STEP_COLUMNS`` order (what an insert sends)."""
        values: tuple[Any, ...] = _STEP_VALUES(self)
        return values


@dataclass(frozen=True, slots=True, kw_only=True)
class EnvelopeRow(RunHeader):
    """One ``workflow_receipts`` row (one envelope revision); field order is the insert order."""

    step_count: int
    allow_count: int
    deny_count: int
    revision: int
    complete: bool
    missing_steps: int
    expected_steps: int | None
    receipt_ids: tuple[str, ...]
    chain_root: bytes
    key_id: str
    signature: bytes
    extra: tuple[tuple[str, str], ...]
    outcome_ids: tuple[str, ...] = ()
    attempts: tuple[AttemptAccount, ...] = ()

    @classmethod
    def from_columns(cls, names: Sequence[str], values: Sequence[Any]) -> Self:
        """The row of a query result row ``values`` whose column names are ``names`` (by name,
        as :meth:`StepRow.from_columns`)."""
        row: Self = _from_columns(cls, ENVELOPE_COLUMNS, names, values)
        return row

    def values(self) -> tuple[Any, ...]:
        """The row's values in ``ENVELOPE_COLUMNS`` order (what an insert sends)."""
        values: list[Any] = list(_ENVELOPE_VALUES(self))
        values[_EXTRA] = dict(self.extra)  # a Map column takes a dict
        values[_ATTEMPTS] = [
            (
                a.activity_id,
                a.activity_type,
                a.attempt,
                a.is_local,
                a.account.value,
                a.reason,
                a.outcome.value,
            )
            for a in self.attempts
        ]
        return tuple(values)


@dataclass(frozen=True, slots=True, kw_only=True)
class OutcomeRow:
    """One ``step_outcomes`` row; the field order is the insert column order, and the first
    fields (through ``chio_signed``) are the ``StepOutcome`` record's Avro fields in Avro order."""

    outcome_id: str
    namespace: str
    workflow_id: str
    run_id: str
    workflow_type: str
    task_queue: str
    activity_id: str
    activity_type: str
    attempt: int
    is_local: bool
    tool_server: str
    tool: str
    capability_id: str
    decision_receipt_id: str
    decision_chio_id: str
    status: str
    error_type: str
    started_at: int
    ended_at: int
    duration_us: int
    result_digest: str
    result_key_id: str
    worker_identity: str
    trace_id: str
    span_id: str
    chio_receipt: str
    chio_signed: bytes
    wire: bytes
    kafka_partition: int
    kafka_offset: int
    is_signed: bool
    chio_receipt_id: str = ""
    kernel_key: str = ""
    policy_hash: str = ""

    @classmethod
    def from_columns(cls, names: Sequence[str], values: Sequence[Any]) -> Self:
        """The row of a query result row ``values`` whose column names are ``names`` (by name,
        as :meth:`StepRow.from_columns`)."""
        row: Self = _from_columns(cls, OUTCOME_COLUMNS, names, values)
        return row

    def values(self) -> tuple[Any, ...]:
        """The row's values in ``OUTCOME_COLUMNS`` order (what an insert sends)."""
        values: tuple[Any, ...] = _OUTCOME_VALUES(self)
        return values


STEP_COLUMNS: tuple[str, ...] = tuple(f.name for f in fields(StepRow))
# Avro field order of StepReceipt: the leading columns of step_receipts.
STEP_FIELDS: tuple[str, ...] = STEP_COLUMNS[: STEP_COLUMNS.index("signature") + 1]
# The Chio receipt's analytics columns, and the ChioStepFields attribute each one comes from.
CHIO_COLUMNS: dict[str, str] = {
    "chio_receipt_id": "receipt_id",
    **{
        name: name
        for name in STEP_COLUMNS[STEP_COLUMNS.index("receipt_kind") :]
        if name != "chio_receipt_id"
    },
}
ENVELOPE_COLUMNS: tuple[str, ...] = tuple(f.name for f in fields(EnvelopeRow))
OUTCOME_COLUMNS: tuple[str, ...] = tuple(f.name for f in fields(OutcomeRow))
# Avro field order of StepOutcome: the leading columns of step_outcomes.
OUTCOME_FIELDS: tuple[str, ...] = OUTCOME_COLUMNS[: OUTCOME_COLUMNS.index("chio_signed") + 1]
# step_row: the record's fields, then wire and the Kafka position, then the Chio columns.
if STEP_COLUMNS[len(STEP_FIELDS) :] != ("wire", "kafka_partition", "kafka_offset", *CHIO_COLUMNS):
    raise RuntimeError("StepRow's columns are not the record's, the position's and Chio's")
_RECORD_VALUES = itemgetter(*STEP_FIELDS)
_CHAIN = STEP_FIELDS.index("capability_chain")
_SCOPE = STEP_FIELDS.index("scope")
_RECEIPT = STEP_FIELDS.index("chio_receipt")
_NO_CHIO: tuple[str, ...] = ("",) * len(CHIO_COLUMNS)
_STEP_SLOTS: tuple[Callable[[StepRow, Any], None], ...] = tuple(
    getattr(StepRow, name).__set__ for name in STEP_COLUMNS
)
_new_row = object.__new__
_STEP_VALUES = attrgetter(*STEP_COLUMNS)
_ENVELOPE_VALUES = attrgetter(*ENVELOPE_COLUMNS)
_OUTCOME_VALUES = attrgetter(*OUTCOME_COLUMNS)
_EXTRA = ENVELOPE_COLUMNS.index("extra")
_ATTEMPTS = ENVELOPE_COLUMNS.index("attempts")
_CONVERTERS: dict[type[Any], dict[str, Callable[[Any], Any]]] = {
    cls: {f.name: _CONVERT[str(f.type)] for f in fields(cls)}
    for cls in (StepRow, EnvelopeRow, OutcomeRow)
}


def step_row(
    record: Mapping[str, Any],
    wire: bytes,
    partition: int,
    offset: int,
    chio: Sequence[str] | None = None,
) -> StepRow:
    """The step_receipts row of a plain decoded step record (fields taken by name).

    A decoded record already has the fields' types (ids as str, timestamps as int µs), so only
    the arrays are converted: this runs once per consumed step. ``chio``: the record's Chio
    analytics columns in ``CHIO_COLUMNS`` order when the caller read them already
    (:func:`chio_columns_batch`); otherwise they are read here."""
    values = list(_RECORD_VALUES(record))
    values[_CHAIN] = tuple(values[_CHAIN])
    values[_SCOPE] = tuple(values[_SCOPE])
    if not values[_RECEIPT]:
        chio = _NO_CHIO
    elif chio is None:
        chio = tuple(chio_columns(record).values())
    values += (wire, partition, offset, *chio)
    # StepRow(**columns) without the keyword call: every slot set in column order (StepRow has
    # no __post_init__, and every field is set, so this is the same row).
    row = _new_row(StepRow)
    for set_slot, value in zip(_STEP_SLOTS, values, strict=True):
        set_slot(row, value)
    return row


def chio_columns(record: Mapping[str, Any]) -> dict[str, str]:
    """The Chio analytics columns of a plain step record (empty strings for a v1 step)."""
    text = record["chio_receipt"]
    fields_ = ChioStepFields(json.loads(text) if text else None)
    return {column: getattr(fields_, attr) for column, attr in CHIO_COLUMNS.items()}


def chio_columns_batch(records: Sequence[Mapping[str, Any]]) -> list[Sequence[str] | None]:
    """:func:`chio_columns` of each plain step record carrying a Chio receipt, as values in
    ``CHIO_COLUMNS`` order, for :func:`step_row`'s ``chio``.

    The receipts are read natively (``chio_receipts_native.chio_columns``: one parse each, the
    GIL released). ``None`` for a record without a receipt, and for one the native reader leaves
    to Python's ``json`` (:func:`step_row` then reads it with :func:`chio_columns`)."""
    texts = [r["chio_receipt"] for r in records]
    native = iter(chio_receipts_native.chio_columns([t for t in texts if t]))
    return [next(native) if text else None for text in texts]


def receipt_from_row(row: StepRow) -> StepReceipt:
    """Rebuild the signed receipt from a step row."""
    values = {name: getattr(row, name) for name in STEP_FIELDS}
    values["verdict"] = Verdict(row.verdict)
    return StepReceipt(**values)


def plain_from_row(row: StepRow) -> dict[str, Any]:
    """The plain Avro record of a step row (ids as str, timestamps as int µs, arrays as lists),
    in Avro field order."""
    rec = {name: getattr(row, name) for name in STEP_FIELDS}
    rec["capability_chain"] = list(row.capability_chain)
    rec["scope"] = list(row.scope)
    return rec


def outcome_row(record: Mapping[str, Any], wire: bytes, partition: int, offset: int) -> OutcomeRow:
    """The step_outcomes row of a plain decoded ``StepOutcome`` record (fields taken by name)."""
    values = {name: record[name] for name in OUTCOME_FIELDS}
    return OutcomeRow(
        **values,
        wire=wire,
        kafka_partition=partition,
        kafka_offset=offset,
        **outcome_columns(record),
    )


def outcome_columns(record: Mapping[str, Any]) -> dict[str, Any]:
    """The analytics columns of a plain outcome record: ``is_signed`` and its receipt's id,
    signer and policy (empty for an unsigned record or an unreadable receipt)."""
    text = record["chio_receipt"]
    try:
        receipt = json.loads(text) if text else None
    except ValueError:
        receipt = None
    chio = ChioStepFields(receipt if isinstance(receipt, dict) else None)
    return {
        "is_signed": bool(text),
        "chio_receipt_id": chio.receipt_id,
        "kernel_key": chio.kernel_key,
        "policy_hash": chio.policy_hash,
    }


def outcome_plain_from_row(row: OutcomeRow) -> dict[str, Any]:
    """The plain Avro record of an outcome row, in Avro field order."""
    return {name: getattr(row, name) for name in OUTCOME_FIELDS}


def outcome_from_row(row: OutcomeRow) -> StepOutcome:
    """Rebuild the ``StepOutcome`` record from an outcome row's columns."""
    return StepOutcome.from_avro(outcome_plain_from_row(row))


def outcome_body(plain: Plain) -> bytes:
    """The bytes of an outcome record inside an envelope: its current-schema body (the wire body
    itself for the current writer schema, a re-encoding otherwise)."""
    return plain.body if plain.current else encode_plain(STEP_OUTCOME_SCHEMA, plain.record)


def envelope_row(envelope: Envelope) -> EnvelopeRow:
    """The workflow_receipts row of an envelope (its revision is the replacing version)."""
    # Every column is an envelope attribute of the same name (``step_count`` a property).
    return EnvelopeRow(**dict(zip(ENVELOPE_COLUMNS, _ENVELOPE_VALUES(envelope), strict=True)))


def envelope_from_row(
    row: EnvelopeRow, steps: Sequence[bytes], outcomes: Sequence[bytes] = ()
) -> Envelope:
    """Rebuild an envelope from its row, its steps' bodies and its outcome records' bodies (in
    the row's ``outcome_ids`` order)."""
    values = {name: getattr(row, name) for name in ENVELOPE_COLUMNS if name != "step_count"}
    return Envelope(**values, steps=tuple(steps), outcomes=tuple(outcomes))


_SOURCES = {s.value.lower(): s for s in CompletionSource}


def completion_from_row(row: EnvelopeRow) -> RunCompletion:
    """The completion facts an envelope row was built from (to revise it later)."""
    extra = dict(row.extra)
    outcome = row.outcome.upper()
    return RunCompletion(
        event_id="",
        namespace=row.namespace,
        workflow_id=row.workflow_id,
        run_id=row.run_id,
        workflow_type=row.workflow_type,
        task_queue="",
        outcome=Outcome(outcome) if outcome in Outcome.__members__ else Outcome.UNKNOWN,
        started_at=row.started_at,
        closed_at=0 if row.completed_at is None else row.completed_at,
        parent_workflow_ids=row.parent_workflow_ids,
        parent_run_id=extra.get("parent_run_id"),
        continued_from_run_id=extra.get("continued_from_run_id"),
        continued_as_new_run_id=extra.get("continued_as_new_run_id"),
        expected_steps=row.expected_steps,
        expected_attempts=expected_from_accounts(row.attempts),
        # The source named by the builder's ``outcome_source`` metadata (a provisional envelope
        # was built from a worker's declaration only); unknown for rows older than the key.
        source=_SOURCES.get(extra.get("outcome_source", ""), CompletionSource.UNKNOWN),
    )


def expected_from_accounts(accounts: Sequence[AttemptAccount]) -> tuple[ExpectedAttempt, ...]:
    """The attempts Temporal listed, as far as an envelope's accounts keep them: Temporal's end
    of an attempt survives only as a ``WORKER_LOST`` account's reason, which is the only state
    where it decides anything (a receipt or a gate-failure record, when it arrives later,
    accounts for the attempt whatever its end)."""
    return tuple(
        ExpectedAttempt(
            activity_id=a.activity_id,
            activity_type=a.activity_type,
            attempt=a.attempt,
            is_local=a.is_local,
            temporal_end=a.reason if a.account is AccountState.WORKER_LOST else "",
        )
        for a in accounts
    )
