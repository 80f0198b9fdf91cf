"""Kafka records for receipts: keys, Avro values and CloudEvents binary-mode headers (pure).

CloudEvents Kafka binding, binary mode: the value is the event data (Avro bytes) and the
attributes travel as ``ce_*`` headers plus ``content-type``. Event types, schema names, header
names, the header builder and the envelope's event id are the contract's (``schemas._contract``,
shared with the consumers); ``STEP_TYPE``, ``COMPLETION_TYPE`` and ``ENVELOPE_TYPE`` are this
package's names for the contract's event types.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable, Mapping
from typing import Any

import chio_receipts_native

import chio_receipts.schemas as schemas
from chio_receipts.streamer._spool import SpoolRecord

__all__ = [
    "COMPLETION_TYPE",
    "CONTENT_TYPE",
    "ENVELOPE_SCHEMA",
    "ENVELOPE_TYPE",
    "OUTCOME_SCHEMA",
    "OUTCOME_TYPE",
    "RUN_COMPLETION_SCHEMA",
    "STEP_SCHEMA",
    "STEP_TYPE",
    "Framer",
    "chio_headers",
    "completion_record",
    "envelope_id",
    "envelope_record",
    "headers",
    "outcome_record",
    "single_object",
    "step_record",
    "worker_envelope_id",
]

STEP_TYPE = schemas.STEP_EVENT_TYPE
OUTCOME_TYPE = schemas.STEP_OUTCOME_EVENT_TYPE
COMPLETION_TYPE = schemas.RUN_COMPLETION_EVENT_TYPE
ENVELOPE_TYPE = schemas.ENVELOPE_EVENT_TYPE
WORKER_ENVELOPE_TYPE = schemas.WORKER_ENVELOPE_EVENT_TYPE
CONTENT_TYPE = schemas.CONTENT_TYPE
STEP_SCHEMA = schemas.STEP_SCHEMA
OUTCOME_SCHEMA = schemas.STEP_OUTCOME_SCHEMA
RUN_COMPLETION_SCHEMA = schemas.RUN_COMPLETION_SCHEMA
ENVELOPE_SCHEMA = schemas.ENVELOPE_SCHEMA
headers = schemas.cloudevent_headers
"""CloudEvents binary-mode headers of one event (the contract's builder)."""

Framer = Callable[[str, bytes, str], bytes]
"""``(schema name, schemaless body, topic) -> value bytes``: the wire format's frame."""


def single_object(name: str, body: bytes, topic: str) -> bytes:
    """The default :data:`Framer`: Avro single-object encoding (no registry)."""
    return _frame_header(name) + body


@functools.cache
def _frame_header(name: str) -> bytes:
    """The single-object header of schema ``name`` (``schemas.frame`` of an empty body: the
    magic and the schema's fingerprint), computed once per schema."""
    return schemas.frame(name, b"")


def _body(name: str, record: dict[str, Any]) -> bytes:
    try:
        return schemas.encode_body(name, record)
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise schemas.EncodeError(f"{name}: {exc}") from exc


def chio_headers(receipt: schemas.StepReceipt) -> tuple[tuple[str, bytes], ...]:
    """chio-streaming's headers of a step that carries a Chio receipt (none for a v1 step).

    ``X-Chio-Receipt`` is the Chio receipt's id; ``X-Chio-Verdict`` its decision's verdict as
    signed, in chio-streaming's lowercase spelling: ``allow`` / ``deny`` from our sidecar, and
    ``incomplete`` for the real kernel's authorized pre-execution decision (chio-streaming 0.1.0
    writes only ``allow``/``deny``, derived from ``is_allowed``, which would call that ``deny``).

    The two values are read natively in one pass over the receipt's JSON
    (``chio_header_values``, no document built); text that scan does not settle exactly (an
    escape in either value, a value that is not a string) is parsed here as before.
    """
    text = receipt.chio_receipt
    if not text:
        return ()
    values = chio_receipts_native.chio_header_values(text)
    if values is None:
        fields = schemas.chio_step_fields(receipt)
        values = (fields.receipt_id, fields.decision)
    receipt_id, verdict = values
    if receipt_id:
        if verdict:
            return ((_X_RECEIPT, receipt_id.encode()), (_X_VERDICT, verdict.encode()))
        return ((_X_RECEIPT, receipt_id.encode()),)
    return ((_X_VERDICT, verdict.encode()),) if verdict else ()


_X_RECEIPT = schemas.X_CHIO_RECEIPT
_X_VERDICT = schemas.X_CHIO_VERDICT


@functools.lru_cache(maxsize=64)
def _step_constants(source: str) -> tuple[tuple[str, bytes], ...]:
    """The headers of a step event that do not depend on the step, as :func:`headers` builds
    them (checked against it by the tests): ``(specversion, type, source, content-type)``."""
    h = headers(event_id="", event_type=STEP_TYPE, source=source, subject="")
    return (h[0], h[2], h[3], h[5])


_CE_ID, _CE_SUBJECT = schemas.CE_HEADERS[1], schemas.CE_HEADERS[4]


def step_record(
    receipt: schemas.StepReceipt,
    body: bytes,
    *,
    topic: str,
    source: str,
    framer: Framer = single_object,
) -> SpoolRecord:
    """The Kafka record of a signed step receipt; ``body`` is framed, never re-encoded.

    Headers: CloudEvents binary mode, then :func:`chio_headers` when the step carries a Chio
    receipt."""
    key = receipt.run_key
    spec, ce_type, ce_source, content_type = _step_constants(source)
    return SpoolRecord(
        topic=topic,
        key=key.encode(),
        value=framer(STEP_SCHEMA, body, topic),
        # headers(event_id=receipt_id, subject=key, ...) + chio_headers(receipt), the constant
        # ones built once per source.
        headers=(
            spec,
            (_CE_ID, receipt.receipt_id.encode()),
            ce_type,
            ce_source,
            (_CE_SUBJECT, key.encode()),
            content_type,
            *chio_headers(receipt),
        ),
    )


def outcome_record(
    outcome: schemas.StepOutcome, *, topic: str, source: str, framer: Framer = single_object
) -> SpoolRecord:
    """The Kafka record of an outcome record: steps topic, keyed by its run key (so it lands on
    the partition of its run's steps), CloudEvents type ``OUTCOME_TYPE``, id its outcome id."""
    key = outcome.run_key
    return SpoolRecord(
        topic=topic,
        key=key.encode(),
        value=framer(OUTCOME_SCHEMA, _body(OUTCOME_SCHEMA, outcome.to_avro()), topic),
        headers=headers(
            event_id=outcome.outcome_id, event_type=OUTCOME_TYPE, source=source, subject=key
        ),
    )


def completion_record(
    event: schemas.RunCompletion, *, topic: str, source: str, framer: Framer = single_object
) -> SpoolRecord:
    """The Kafka record of a run-completion event."""
    key = event.run_key
    return SpoolRecord(
        topic=topic,
        key=key.encode(),
        value=framer(RUN_COMPLETION_SCHEMA, _body(RUN_COMPLETION_SCHEMA, event.to_avro()), topic),
        headers=headers(
            event_id=event.event_id, event_type=COMPLETION_TYPE, source=source, subject=key
        ),
    )


def envelope_id(envelope: Mapping[str, Any]) -> str:
    """The event id of an envelope revision: ``workflow_id/run_id/revision``."""
    revision = dict(envelope.get("metadata") or {}).get("revision", "0")
    return schemas.envelope_event_id(
        str(envelope["workflow_id"]), str(envelope["run_id"]), revision
    )


def worker_envelope_id(envelope: Mapping[str, Any], body: bytes) -> str:
    """The event id of a worker's flush: ``workflow_id/run_id/worker-<chain root>`` (the hash
    of the body when the envelope names no chain root); never a builder revision's id."""
    root = str(dict(envelope.get("metadata") or {}).get("chain_root") or "")
    return schemas.worker_envelope_event_id(
        str(envelope["workflow_id"]), str(envelope["run_id"]), root or _sha256_hex(body)
    )


def envelope_record(
    envelope: Mapping[str, Any], *, topic: str, source: str, framer: Framer = single_object
) -> SpoolRecord:
    """The Kafka record of a worker's ``chio-temporal/v1`` envelope (its own flush), keyed by
    its run key. It shares the envelopes topic with the builder's revisions but never looks
    like one: type ``WORKER_ENVELOPE_TYPE``, an id of its own (:func:`worker_envelope_id`)."""
    metadata = dict(envelope.get("metadata") or {})
    key = schemas.run_key(
        str(metadata.get("namespace", "")), str(envelope["workflow_id"]), str(envelope["run_id"])
    )
    body = _body(ENVELOPE_SCHEMA, dict(envelope))
    return SpoolRecord(
        topic=topic,
        key=key.encode(),
        value=framer(ENVELOPE_SCHEMA, body, topic),
        headers=headers(
            event_id=worker_envelope_id(envelope, body),
            event_type=WORKER_ENVELOPE_TYPE,
            source=source,
            subject=key,
        ),
    )


def _sha256_hex(body: bytes) -> str:
    """Hex SHA-256 of ``body``."""
    return hashlib.sha256(body).hexdigest()
